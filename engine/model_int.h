/* engine-internal: struct eng_model, shared by model.c (loading) and
 * forward.c (the forward pass, which also defines struct eng_ctx). Not for
 * other modules. */
#ifndef GORGON_ENG_MODEL_INT_H
#define GORGON_ENG_MODEL_INT_H

#include "engine/model.h"

struct eng_model {
    eng_gguf *gguf; /* owns the mapping every kn_tensor points into */
    eng_tok *tok;   /* NULL when the file has no tokenizer */
    eng_hparams hp;
    kn_tensor tok_embd, output;
    const float *output_norm;
    eng_layer *layers; /* [n_layer] */
    int64_t bytes_per_token, matmul_params;
};

#endif
