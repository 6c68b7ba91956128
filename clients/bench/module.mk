# gorgon-bench links the engine for its `engine` suite (libgorgon itself never does).
$(eval $(call add_prog,gorgon-bench,$(wildcard clients/bench/*.c),gorgon ipc $(ENGINE_LIBS),$(IPC_LDLIBS) $(ENGINE_LDLIBS)))
