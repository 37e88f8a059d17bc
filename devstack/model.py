"""Write a tiny llama-architecture GGUF model with random weights, using llama.cpp's own ``gguf`` writer.

No model can be downloaded here, and the balancer does not care what a model says, only
how long a slot stays busy. This model loads in milliseconds, generates ~2,000 tokens/s
on two cores, and ``n_predict`` with ``ignore_eos`` keeps a slot busy for as long as a
test needs. A byte-fallback SPM vocabulary means any prompt tokenises.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

N_VOCAB = 3 + 256  # <unk>, <s>, </s>, then one token per byte
N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_LAYER = 2
N_CTX_TRAIN = 4096
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tiny_model(path: str | Path, seed: int = 0) -> Path:
    import gguf  # test-time dependency only

    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("paddler-tiny-test-model")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    token_types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    token_types += [gguf.TokenType.BYTE] * 256
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * N_VOCAB)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int) -> None:
        # numpy shapes are ggml's ne reversed: token_embd is ne=[n_embd, n_vocab].
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(N_EMBD, dtype=np.float32))

    tensor("token_embd.weight", N_VOCAB, N_EMBD)
    norm("output_norm.weight")
    tensor("output.weight", N_VOCAB, N_EMBD)
    for block in range(N_LAYER):
        prefix = f"blk.{block}"
        norm(f"{prefix}.attn_norm.weight")
        for part in ("q", "k", "v", "output"):
            tensor(f"{prefix}.attn_{part}.weight", N_EMBD, N_EMBD)
        norm(f"{prefix}.ffn_norm.weight")
        tensor(f"{prefix}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"{prefix}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"{prefix}.ffn_down.weight", N_EMBD, N_FF)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    print(write_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"))
