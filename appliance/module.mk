# appliance: gorgond, the supervisor daemon (one io_uring loop).
appliance_SRCS := $(wildcard appliance/*.c)
$(eval $(call add_prog,gorgond,$(appliance_SRCS),ipc common,$(IPC_LDLIBS) $(COMMON_LDLIBS)))
