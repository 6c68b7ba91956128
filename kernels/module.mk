# kernels: the backend interface (kn.h) and its backends, one library.
# kernels/cpu: scalar reference + AVX2 + AVX-512 variants, compiled with
# per-file ISA flags and chosen at run time (the binary runs on any x86-64).
# kernels/cuda/module.mk (included before this file when CUDA=1) sets
# KERNELS_CUDA_SRCS (its .cu/.c files), KERNELS_CUDA_LDLIBS (cudart, cuBLASLt)
# and NVCCFLAGS, and defines GORGON_CUDA for the C files that offer it.
kernels_SRCS := $(wildcard kernels/cpu/*.c) $(KERNELS_CUDA_SRCS)
$(eval $(call add_lib,kernels,$(kernels_SRCS)))
KN_AVX2_FLAGS   := -mavx2 -mfma -mf16c
KN_AVX512_FLAGS := -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16 -mfma -mf16c -mavx2
$(B)/kernels/cpu/%_avx2.o: CFLAGS += $(KN_AVX2_FLAGS)
$(B)/kernels/cpu/%_avx512.o: CFLAGS += $(KN_AVX512_FLAGS)
KERNELS_LDLIBS := -lm $(KERNELS_CUDA_LDLIBS)

# kn_ctx.c and kn_buf.c offer the CUDA backend when it is built
# (GORGON_CUDA). A stamp holding the CUDA setting recompiles them when it
# changes, so one build tree can switch between CUDA=0 and CUDA=1 without
# mixing objects of both.
KN_DEV_OBJS := $(B)/kernels/cpu/kn_ctx.o $(B)/kernels/cpu/kn_buf.o
$(B)/gen/kn_cuda.flag: FORCE
	@mkdir -p $(@D)
	$(Q)v='$(CUDA)'; [ "$$(cat $@ 2>/dev/null)" = "$$v" ] || echo "$$v" > $@
$(KN_DEV_OBJS): $(B)/gen/kn_cuda.flag
ifeq ($(CUDA),1)
$(KN_DEV_OBJS): CPPFLAGS += -DGORGON_CUDA
endif
