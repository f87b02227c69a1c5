"""Fuzz the GGUF reader: mutate a small real header (byte flips, truncations, huge lengths, inserted/deleted bytes)
and check that nothing but GGUFError escapes and that every parse finishes quickly."""
from __future__ import annotations

import signal
import struct
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vlm_kernels.quant import GGMLType, QTensor
from vlm.gguf import GGUFError, GGUFFile, StringArray, write_gguf

MAX_EXAMPLES = 200
DEADLINE = timedelta(seconds=2)     # hypothesis per-example limit (a parse takes ~1 ms; 2 s absorbs a busy CI box)
HARD_LIMIT_S = 10                   # SIGALRM backstop: a hang or a runaway allocation fails the example
PLAIN = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
INTERESTING_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1, 1 << 40]
INTERESTING_U32 = [0, 1, 4, 5, 8, 9, 12, 13, 31, 40, 99, 2**16, 2**31, 2**32 - 1]


def _base_file(path) -> bytes:
    g = torch.Generator().manual_seed(0)
    meta = {
        "general.name": "fuzz", "llama.block_count": 2, "llama.rope.freq_base": 10000.0,
        "llama.nested": [[1, 2], [3]], "tokenizer.ggml.merges": ["a b", "ab c"],
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(300)],     # > 256: the lazy StringArray path
        "tokenizer.ggml.scores": np.linspace(-1, 0, 300, dtype=np.float32),
        "tokenizer.ggml.token_type": np.ones(10, dtype=np.int32), "tokenizer.ggml.add_bos_token": True,
    }
    tensors = {
        "token_embd.weight": QTensor(torch.randint(0, 256, (2, 18), dtype=torch.uint8, generator=g),
                                     GGMLType.Q4_0, (2, 32)),
        "blk.0.ffn_down.weight": QTensor(torch.randint(0, 256, (1, 144), dtype=torch.uint8, generator=g),
                                         GGMLType.Q4_K, (1, 256)),
        "output_norm.weight": torch.randn(4, generator=g),
        "blk.0.attn_q.weight": torch.randn(2, 8, generator=g).half(),
    }
    write_gguf(path, "llama", meta, tensors)
    return path.read_bytes()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    data = _base_file(d / "base.gguf")
    with GGUFFile(d / "base.gguf") as f:
        header_end = f.data_offset
    # positions of u64 length/count fields (small values, upper bytes zero): where huge lengths hurt most
    length_fields = [p for p in range(0, header_end - 8) if 0 < struct.unpack_from("<Q", data, p)[0] < 4096]
    return d / "mutant.gguf", data, header_end, length_fields


def _touch_everything(path) -> None:
    """Parse, then read every value and tensor the way a model loader would."""
    with GGUFFile(path) as f:
        for key, value in f.metadata.items():
            f.value_type(key)
            if isinstance(value, StringArray):
                value.tolist()
        f.typed_metadata()
        for name, info in f.tensors.items():
            q = f.tensor(name)
            assert q.nbytes == info.nbytes
            if info.qtype in PLAIN:
                f.load(name)


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind, pos = op[0], min(op[1], len(b))
        if kind == "flip":
            if pos < len(b):
                b[pos] = op[2]
        elif kind == "truncate":
            del b[pos:]
        elif kind == "u64":
            b[pos:pos + 8] = struct.pack("<Q", op[2])
        elif kind == "u32":
            b[pos:pos + 4] = struct.pack("<I", op[2])
        elif kind == "insert":
            b[pos:pos] = op[2]
        elif kind == "delete":
            del b[pos:pos + op[2]]
    return bytes(b)


def _ops(header_end: int, length_fields: list[int], size: int):
    anywhere = st.integers(0, size)
    in_header = st.integers(0, header_end)
    pos = st.one_of(in_header, in_header, anywhere)
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 255)),
        st.tuples(st.just("truncate"), anywhere),
        st.tuples(st.just("u64"), st.sampled_from(length_fields),
                  st.one_of(st.sampled_from(INTERESTING_U64), st.integers(0, 2**64 - 1))),
        st.tuples(st.just("u64"), pos, st.sampled_from(INTERESTING_U64)),
        st.tuples(st.just("u32"), pos, st.sampled_from(INTERESTING_U32)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 16)),
    )
    return st.lists(op, min_size=1, max_size=4)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"parse took longer than {HARD_LIMIT_S} s")


def test_base_file_parses(base):
    path, data, header_end, length_fields = base
    path.write_bytes(data)
    _touch_everything(path)
    assert len(length_fields) > 300     # every token's length prefix is a target


@settings(max_examples=MAX_EXAMPLES, deadline=DEADLINE, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_headers_raise_only_gguf_errors(base, data):
    path, original, header_end, length_fields = base
    ops = data.draw(_ops(header_end, length_fields, len(original)), label="ops")
    path.write_bytes(_mutate(original, ops))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HARD_LIMIT_S)
    t0 = time.perf_counter()
    try:
        _touch_everything(path)
    except GGUFError as e:
        assert str(path) in str(e)                   # the message names the file
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < HARD_LIMIT_S
