/* Device names, as users write them in flags and config files (gorgon-run
 * --device, gorgon-worker --device, gorgond's `device` key) and as the
 * kernels take them (kn_ctx_cfg.device). One grammar, parsed here, so that
 * gorgond, which never links the kernels, refuses exactly what a worker
 * would. */
#ifndef GORGON_CM_DEVICE_H
#define GORGON_CM_DEVICE_H

/* NULL, "" or "cpu": *cuda_index = -1 (the CPU); "cuda": 0; "cuda:N" with
 * N a decimal in 0..1023: N. Returns 0, or -EINVAL (nothing written) for
 * anything else. */
int cm_device_parse(const char *s, int *cuda_index);

#endif
