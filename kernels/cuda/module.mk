# kernels/cuda: the CUDA backend (kn_cuda.h says how its files meet).
# Included before kernels/module.mk when CUDA=1 (the top-level Makefile has
# set NVCC, CUDA_HOME and CUDA_LIBDIR by then). It sets what kernels/module.mk
# and the top-level %.cu rule use:
#   KERNELS_CUDA_SRCS    every .cu and .c here; their objects go into
#                        libkernels
#   KERNELS_CUDA_LDLIBS  the static CUDA runtime, so that binaries start on
#                        machines without libcudart or a driver (the backend
#                        then reports -ENODEV); cuBLASLt is dlopen'ed by
#                        kn_cuda_mm.cu. -lstdc++: nvcc's generated launch
#                        stubs use guarded statics and the C++ personality
#                        routine, and programs are linked with $(CC).
#   NVCCFLAGS            sm_90 cubin (H100/H200) plus compute_90 PTX, which
#                        the driver JITs on newer GPUs
# (kernels/module.mk defines GORGON_CUDA for the C files that offer the
# backend.)
KERNELS_CUDA_SRCS   := $(wildcard kernels/cuda/*.cu) $(wildcard kernels/cuda/*.c)
KERNELS_CUDA_LDLIBS := -L$(CUDA_LIBDIR) -lcudart_static -ldl -lrt -lpthread -lstdc++

NVCC_ARCH := -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90
# -MMD -MP: nvcc writes X.cu.d beside X.cu.o, which the top level includes.
NVCCFLAGS := -std=c++17 -O3 -lineinfo $(NVCC_ARCH) -Xcompiler -fPIC -I. -MMD -MP
ifeq ($(WERROR),1)
NVCCFLAGS += -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
else
NVCCFLAGS += -Xcompiler -Wall,-Wextra
endif
ifeq ($(MODE),debug)
NVCCFLAGS += -g
endif

# The CUDA headers, for C files here that want the runtime API.
$(B)/kernels/cuda/%.o: CPPFLAGS += -I$(CUDA_HOME)/include
