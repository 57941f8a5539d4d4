"""DeepSeek sparse attention (DSA): DeepSeek-V3.2 and GLM-5 (``glm_moe_dsa``). DeepSeek-V3's blocks (multi-head latent
attention, sigmoid routing with a correction bias and group-limited top-k, shared experts, dense first blocks), and in
the attention an ``indexer``: a light scorer of every earlier key per query whose top ``index_topk`` are the only keys
the query attends to (the others are masked before the softmax). The indexer returns those key positions
[batch, queries, k]; the sink section reads them there (``Adapter.indexer``).

The dense blocks are the ones ``mlp_layer_types`` calls "dense". GLM-5's ``indexer_types`` lets a block reuse the
previous block's selection ("shared"): such a block runs no indexer of its own, and its selection is not read.
"""

from . import moe
from .base import Moe, Variant

_INDEXER = "self_attn.indexer"
_NOTE = (moe._DEEPSEEK_NOTE + "; DeepSeek sparse attention: an indexer picks the keys each query attends to (the "
         "sink section reports how often the sink tokens are among them)")


DEEPSEEK_V32 = moe._sparse(
    moe._MLA, "DeepSeek-V3.2", ("deepseek_v32",), Moe(router=moe._SIGMOID, shared=moe._DEEPSEEK_SHARED),
    indexer=_INDEXER, variants=(Variant(when=moe._listed_dense, changes=moe._dense()),), notes=_NOTE,
)

GLM_MOE_DSA = moe._sparse(
    moe._MLA, "GLM-5", ("glm_moe_dsa",), Moe(router=moe._SIGMOID, shared=moe._DEEPSEEK_SHARED),
    indexer=_INDEXER,
    variants=(Variant(when=moe._listed_dense, changes=moe._dense()),
              Variant(when=lambda config, layer: config.indexer_types[layer] == "shared", changes={"indexer": None})),
    notes=_NOTE + "; blocks of indexer type \"shared\" reuse the previous block's selection (not read there)",
)
