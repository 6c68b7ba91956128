# engine/model: what gorgond needs of a model and nothing that computes:
# GGUF read/write, safetensors, the tokenizer, stop conditions, the engine's
# error message. Links no kernels (only kernels/kn.h's dtype names).
engmodel_SRCS := $(wildcard engine/model/*.c)
$(eval $(call add_lib,engmodel,$(engmodel_SRCS)))
ENGMODEL_LDLIBS := -ljansson -lm
