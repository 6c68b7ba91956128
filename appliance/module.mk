# appliance: gorgond, the supervisor daemon (one io_uring loop).
appliance_SRCS := $(wildcard appliance/*.c)
# Type=notify under systemd (deploy/gorgond.service): sd_notify from
# libsystemd (Debian: libsystemd-dev) when pkg-config finds it. Without it
# gorgond still builds and runs, and warns when NOTIFY_SOCKET asks for a
# notification it cannot send (then use Type=simple with --foreground).
GORGOND_SYSTEMD_LIBS := $(shell pkg-config --libs libsystemd 2>/dev/null)
ifneq ($(GORGOND_SYSTEMD_LIBS),)
CFLAGS_appliance_gorgond := -DGORGON_HAVE_SYSTEMD $(shell pkg-config --cflags libsystemd 2>/dev/null)
endif
# gorgond links engine/model (tokenizer, GGUF reader, stop strings) and engine/comm (it
# creates a worker group's region): no kernels, no forward pass.
$(eval $(call add_prog,gorgond,$(appliance_SRCS),ipc engmodel comm common,$(IPC_LDLIBS) $(ENGMODEL_LDLIBS) $(COMMON_LDLIBS) $(GORGOND_SYSTEMD_LIBS)))
