# gorgon-bench links the engine for its `engine` suite (libgorgon itself never does);
# `serve --base-url` speaks HTTP with libcurl and reads JSON with jansson.
$(eval $(call add_prog,gorgon-bench,$(wildcard clients/bench/*.c),gorgon ipc $(ENGINE_LIBS),$(IPC_LDLIBS) $(ENGINE_LDLIBS) -lcurl -ljansson))
