"""Tokenizes strings with llama.cpp (llama-cpp-python), reading the vocabulary of a GGUF file.

Called by engine/tests/gguf.rs (not by hand) as

    python llamacpp_tokenize.py IN.json OUT.json

IN.json:  {"gguf": PATH, "texts": [str, ...]}
OUT.json: {"ids": [[int, ...] per text], "detok": [str per text]}

The model is opened with `llama_cpp.Llama(model_path=PATH, vocab_only=True)` (no weights are
loaded). `ids` is `tokenize(text.encode("utf-8"), add_bos=False, special=True)`: special tokens
written in the text (`<|im_start|>`, `<|endoftext|>`, ...) become their ids, and no BOS is added.
`detok` is llama.cpp's `llama_detokenize` of those ids with special tokens written out
(unparse_special=True, remove_special=False), decoded as UTF-8 with errors="replace"; for most
texts it gives the text back. It calls the C function itself rather than `Llama.detokenize`,
which drops a leading space after a BOS token and, with special=False, prints control tokens as
nothing.
"""

import ctypes
import json
import sys

import llama_cpp


def detokenize(vocab, ids):
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 16 * len(ids)
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, True)
        if n >= 0:
            return buf.raw[:n]
        size = -n + 1


def main():
    case = json.load(open(sys.argv[1], encoding="utf-8"))
    llm = llama_cpp.Llama(model_path=case["gguf"], vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ids, detok = [], []
    for text in case["texts"]:
        t = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []
        ids.append([int(i) for i in t])
        detok.append(detokenize(vocab, t).decode("utf-8", errors="replace"))
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump({"ids": ids, "detok": detok}, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
