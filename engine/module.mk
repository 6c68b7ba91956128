# engine: the forward pass, KV cache and sampler (engine/*.c) and Medusa
# (engine/medusa/*.c), over the backend (kernels) and the model files
# (engine/model). Every engine/tools/NAME.c becomes the program gorgon-NAME
# (underscores -> dashes).
engine_SRCS := $(wildcard engine/*.c) $(wildcard engine/medusa/*.c)
$(eval $(call add_lib,engine,$(engine_SRCS)))
ENGINE_LIBS   := engine engmodel comm kernels common
ENGINE_LDLIBS := $(KERNELS_LDLIBS) $(COMMON_LDLIBS) $(ENGMODEL_LDLIBS) -lnuma
$(foreach f,$(wildcard engine/tools/*.c),$(eval $(call add_prog,gorgon-$(subst _,-,$(basename $(notdir $(f)))),$(f),$(ENGINE_LIBS),$(ENGINE_LDLIBS))))
