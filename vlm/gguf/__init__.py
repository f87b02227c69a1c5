"""GGUF I/O: the fast memory-mapped reader (:mod:`vlm.gguf.reader`), the writer (:mod:`vlm.gguf.writer`) and
their errors (:mod:`vlm.gguf.errors`).

    from vlm.gguf import GGUFFile, write_gguf
    f = GGUFFile("model.gguf")              # metadata + tensor table, mmapped
    write_gguf("out.gguf", "llama", {"llama.block_count": 2}, {"token_embd.weight": t})
"""
from gguf import GGUFValueType

from vlm_kernels.quant import GGMLType
from vlm.gguf.errors import GGUFError, GGUFFormatError, GGUFKeyError, GGUFUnsupportedError
from vlm.gguf.reader import GGUFFile, StringArray, TensorInfo
from vlm.gguf.writer import BulkArrayWriter, write_gguf

__all__ = ["GGUFFile", "TensorInfo", "StringArray", "write_gguf", "BulkArrayWriter", "GGUFError",
           "GGUFFormatError", "GGUFUnsupportedError", "GGUFKeyError", "GGUFValueType", "GGMLType"]
