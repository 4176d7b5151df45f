"""``SkipGPTQwen2ForCausalLM``: vLLM's Qwen2 with a router before every attention and MLP.

Qwen2's decoder layer has Llama's parts (``qkv_proj`` with biases, rotary, ``o_proj``, a gated MLP,
two pre-norms), so the routing is ``serving.vllm_llama``'s mixins over vLLM's Qwen2 classes; see
that module for what a routed layer does. Qwen2 configs with ``qk_norm`` (a per-head norm of the
queries and keys before rotary) are refused: the K/V-only path would skip that norm.
"""

from __future__ import annotations

from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.utils import PPMissingLayer, maybe_prefix

from ..errors import SkipGPTError
from .vllm_llama import RoutedCausalLMMixin, RoutedLayerMixin, RoutedModelMixin

__all__ = ["SkipGPTQwen2ForCausalLM"]


class SkipGPTQwen2DecoderLayer(RoutedLayerMixin, Qwen2DecoderLayer):
    """vLLM's Qwen2 decoder layer, routed."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        if getattr(self.self_attn, "qk_norm", False):
            raise SkipGPTError("the routed vLLM Qwen2 does not support qk_norm configs")
        self._init_routing(config, prefix)


@ignore_torch_compile
class SkipGPTQwen2Model(RoutedModelMixin, Qwen2Model):
    """Qwen2Model over routed layers."""

    dense_layer_type = Qwen2DecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=SkipGPTQwen2DecoderLayer)
        self._init_routing_state(vllm_config)


class SkipGPTQwen2ForCausalLM(RoutedCausalLMMixin, Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM whose decoder layers are routed (``architectures`` of a prepared folder).

    ``Qwen2ForCausalLM.__init__`` builds its ``Qwen2Model`` itself (no hook to pass another class),
    so this one builds the same parts around ``SkipGPTQwen2Model``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        self._model_path = vllm_config.model_config.model
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = SkipGPTQwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=self.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
