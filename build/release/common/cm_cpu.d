build/release/common/cm_cpu.o: common/cm_cpu.c common/cm_cpu.h
common/cm_cpu.h:
