/* Where tests find the real models (../shared/models/, see its README).
 * Linked into every test binary (tests/util/). */
#ifndef GORGON_TEST_MODELS_H
#define GORGON_TEST_MODELS_H

/* $GORGON_TEST_MODELS, else ../shared/models from the working directory
 * (make test runs from the repo root), else the same path relative to the
 * repo root found from this executable (build/<mode>/tests/NAME). Static
 * storage; never NULL. */
const char *tu_models_dir(void);

/* "<models dir>/<rel>" in static storage (overwritten by the next call);
 * the calling test fails with a clear message when the file is missing. */
const char *tu_model_path(const char *rel);

#endif
