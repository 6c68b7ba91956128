/* engine-internal: struct eng_model, shared by model.c (loading) and
 * forward.c (the forward pass, which also defines struct eng_ctx). Not for
 * other modules. */
#ifndef GORGON_ENG_MODEL_INT_H
#define GORGON_ENG_MODEL_INT_H

#include "engine/model.h"

struct eng_model {
    eng_gguf *gguf; /* owns the mapping every kn_tensor points into */
    eng_tok *tok;   /* NULL when the file has no tokenizer */
    eng_hparams hp;  /* the whole model's */
    eng_hparams lhp; /* this rank's shard (tp == 1: hp); n_vocab = output rows */
    int tp, tp_rank;
    int64_t vocab0;  /* first vocabulary row of the output slice */
    int64_t vocab_chunk; /* output rows per rank, padded: ceil(n_vocab / tp) */
    kn_tensor tok_embd, output;
    void **owned; /* [2 * n_layer]: packed column slices (Wo, Wdown) this rank copied */
    const float *output_norm;
    eng_layer *layers; /* [n_layer] */
    int64_t bytes_per_token, matmul_params;
    /* Non-NULL once the weights live in this backend's buffers
     * (eng_model_to_device, eng_model_synthetic): the matrices were made
     * with kn_tensor_to_backend or kn_buf_alloc, the norm vectors sit in
     * `norms`; all are freed with the model. */
    kn_ctx *dev;
    float *norms;
    bool synthetic; /* matrices from kn_buf_alloc (freed with kn_buf_free) */
};

#endif
