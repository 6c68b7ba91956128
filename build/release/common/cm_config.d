build/release/common/cm_config.o: common/cm_config.c common/cm_config.h
common/cm_config.h:
