build/release/tests/common/test_common.o: tests/common/test_common.c \
 common/common.h common/cm_assert.h common/cm_config.h common/cm_cpu.h \
 common/cm_err.h common/cm_log.h common/cm_time.h
common/common.h:
common/cm_assert.h:
common/cm_config.h:
common/cm_cpu.h:
common/cm_err.h:
common/cm_log.h:
common/cm_time.h:
