/* common — the few things every gorgon module needs: logging, -errno helpers,
 * monotonic time, CPU feature detection, INI config and internal assertions.
 *
 * Threading: every function here may be called from any thread. The log sink
 * and level are process-wide; set them once at start-up.
 *
 *   cm_log_set_level(CM_LOG_DEBUG);
 *   CM_LOG_INFO("ipc", "region %zu bytes", size);
 *   uint64_t t0 = cm_now_ns();
 *   if (cm_cpu()->avx512f) ...
 */
#ifndef GORGON_COMMON_H
#define GORGON_COMMON_H

#include "common/cm_assert.h"
#include "common/cm_config.h"
#include "common/cm_cpu.h"
#include "common/cm_err.h"
#include "common/cm_log.h"
#include "common/cm_time.h"
#include "common/cm_version.h"

#endif
