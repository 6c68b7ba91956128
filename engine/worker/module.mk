# engine/worker: gorgon-worker, the rank process gorgond starts: the engine
# behind the worker region's command and event rings (ipc).
worker_SRCS := $(wildcard engine/worker/*.c)
$(eval $(call add_prog,gorgon-worker,$(worker_SRCS),$(ENGINE_LIBS) ipc,$(ENGINE_LDLIBS) $(IPC_LDLIBS)))
