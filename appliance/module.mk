# appliance: gorgond, the supervisor daemon (one io_uring loop).
appliance_SRCS := $(wildcard appliance/*.c)
# gorgond links engine/model (tokenizer, GGUF reader, stop strings): no kernels, no forward pass.
$(eval $(call add_prog,gorgond,$(appliance_SRCS),ipc engmodel common,$(IPC_LDLIBS) $(ENGMODEL_LDLIBS) $(COMMON_LDLIBS)))
