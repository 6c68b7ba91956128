# engine: model files, tokenizer, forward pass, KV cache, sampler.
# Every engine/tools/NAME.c becomes the program gorgon-NAME (underscores -> dashes).
engine_SRCS := $(wildcard engine/*.c)
$(eval $(call add_lib,engine,$(engine_SRCS)))
ENGINE_LIBS   := engine kernels common
# Tools also get libipc: gorgon-worker speaks the ring protocol to gorgond.
ENGINE_TOOL_LIBS := engine kernels ipc common
ENGINE_LDLIBS := $(KERNELS_LDLIBS) $(COMMON_LDLIBS) -ljansson -lnuma -lm
$(foreach f,$(wildcard engine/tools/*.c),$(eval $(call add_prog,gorgon-$(subst _,-,$(basename $(notdir $(f)))),$(f),$(ENGINE_TOOL_LIBS),$(ENGINE_LDLIBS) $(IPC_LDLIBS))))
