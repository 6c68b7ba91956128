ipc_SRCS := $(wildcard ipc/*.c)
$(eval $(call add_lib,ipc,$(ipc_SRCS)))
IPC_LDLIBS := $(shell pkg-config --libs liburing 2>/dev/null || echo -luring) -lnuma
