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
