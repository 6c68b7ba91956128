# appliance: gorgond, the supervisor daemon (one io_uring loop).
appliance_SRCS := $(wildcard appliance/*.c)
# Only the tokenizer and the GGUF reader of libengine end up in gorgond (no kernels).
$(eval $(call add_prog,gorgond,$(appliance_SRCS),ipc engine common,$(IPC_LDLIBS) $(ENGINE_LDLIBS)))
