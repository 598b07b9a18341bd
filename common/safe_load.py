"""Reading tensors from files a user may have been handed, as data and never as code.

    state = load_torch_data(path)        # torch.save's zip file, scanned first, then torch.load(weights_only=True)
    weights = load_weights(path)         # safetensors (holds no code), or a pickle .bin through load_torch_data

A pickle can call any function while it is read. torch.load(weights_only=True) refuses what is not a tensor or a
plain container, but it was bypassable before torch 2.6 (CVE-2025-32434) and its refusal names a global, not a
file. So every pickle is first scanned without being run: each global it names must be one this project writes
(tensor storages, the tensor rebuilder, OrderedDict), and it may not build objects any other way. A file that
fails is refused (UnsafeFile) before any of it runs; only then does torch's restricted loader read it.
"""
from __future__ import annotations

import pickle
import pickletools
import zipfile

import torch

_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
# Everything torch.save puts into a file of tensors, plain containers and numbers (checked on this project's
# state.pt: optimizer moments, step counters, hyperparameters, the RNG state).
ALLOWED_GLOBALS = frozenset({"torch._utils _rebuild_tensor_v2", "collections OrderedDict",
                             *(f"torch {kind}Storage" for kind in _STORAGES)})
# Opcodes that reach a callable or build an object other than through an allowed GLOBAL. torch.save writes
# pickle protocol 2 and uses none of them; a crafted pickle needs one of them or a foreign GLOBAL to run code.
_OBJECT_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4",
                             "PERSID"})
_STRING_OPCODES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                             "BINSTRING", "STRING"})


class UnsafeFile(ValueError):
    """A file that holds something other than tensors and plain data; the message is one line naming both."""


def code_in_pickle(data: bytes) -> str | None:
    """What in a pickle is not plain data (a global outside ALLOWED_GLOBALS, an object-building opcode), or None.

    Reads the opcodes without running any of them.
    """
    pushed: list[str | None] = []  # what each opcode pushed (strings kept), to name a STACK_GLOBAL's target
    memo: dict[int, str | None] = {}
    unexpected = None  # an opcode torch.save never writes, reported only if nothing worse is found
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "GLOBAL" and arg not in ALLOWED_GLOBALS:
                return _callable_name(arg.replace(" ", "."))
            if name == "STACK_GLOBAL":
                target = " ".join(pushed[-2:]) if len(pushed) >= 2 and None not in pushed[-2:] else None
                if target not in ALLOWED_GLOBALS:
                    return _callable_name(target.replace(" ", ".") if target else "a name computed in the pickle")
                unexpected = unexpected or "a name looked up by the opcode STACK_GLOBAL, which this project's checkpoints (pickle protocol 2) never hold"
            elif name in _OBJECT_OPCODES:
                return f"an object built by the pickle opcode {name}"
            if name in _STRING_OPCODES:
                pushed.append(arg if isinstance(arg, str) else repr(arg))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif op.stack_after:
                pushed.append(None)
    except (ValueError, EOFError) as e:  # genops on bytes that are not one whole pickle
        return f"bytes that are not a whole pickle ({e})"
    return unexpected


def _callable_name(dotted: str) -> str:
    return f"a reference to {dotted} (code, not tensors or plain data)"


def code_in_torch_file(path: str) -> str | None:
    """What in a torch.save file is not plain data, or None; the file must be torch's zip format."""
    if not zipfile.is_zipfile(path):
        return "bytes not in torch.save's zip format (the only format this project writes)"
    with zipfile.ZipFile(path) as z:
        pickles = [n for n in z.namelist() if n.endswith(".pkl")]
        if not pickles:
            return "a zip file without a pickle (not written by torch.save)"
        for name in pickles:
            found = code_in_pickle(z.read(name))
            if found:
                return found
    return None


def refuse_code(path: str) -> None:
    """UnsafeFile, naming the file and what it holds, if a torch.save file holds more than tensors and plain data."""
    found = code_in_torch_file(path)
    if found:
        raise UnsafeFile(f"{path} holds {found}: refused before loading it, since a file of tensors never holds "
                         "code; it was not written by this project, or was altered after")


def load_torch_data(path: str, mmap: bool = False) -> object:
    """A torch.save file's tensors and plain data, refused (UnsafeFile) before any of it runs if it holds more."""
    refuse_code(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # torch's restricted loader refused what the scan let through
        raise UnsafeFile(f"{path}: torch's weights-only loader refused it ({str(e).strip().splitlines()[0][:160]})"
                         "; it was not written by this project, or was altered after") from None


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """name -> tensor from a safetensors file, or from a pickle-format .bin through load_torch_data."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = load_torch_data(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeFile(f"{path} holds {type(state).__name__}, not a dict of tensors: not a weights file")
    return state

