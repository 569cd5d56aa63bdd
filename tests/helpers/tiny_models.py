"""Tiny random checkpoints built at test time (never committed): BERT and XLM-RoBERTa encoders in
sentence-transformers layout, a cross-encoder, a classifier, and a config of an unsupported type."""

from __future__ import annotations

import json
from pathlib import Path

from exporters import probes

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-:;()")
CJK = sorted(set("".join(probes.CHINESE) + "中文长文本机器学习是什么"))


def _words() -> list[str]:
    text = " ".join([*probes.ENGLISH, probes.long_text(50), *probes.QUERIES]).lower()
    cleaned = "".join(ch if ch.isalnum() else " " for ch in text)
    return sorted(set(cleaned.split()))


def write_bert_vocab(directory: Path, with_cjk: bool = True) -> Path:
    vocab = [*SPECIAL, *LETTERS, *["##" + ch for ch in LETTERS], *_words(), *(CJK if with_cjk else [])]
    seen: list[str] = []
    for token in vocab:
        if token not in seen:
            seen.append(token)
    path = directory / "vocab.txt"
    path.write_text("\n".join(seen) + "\n", encoding="utf-8")
    return path


def _bert_tokenizer(directory: Path, with_cjk: bool = True):  # type: ignore[no-untyped-def]
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_bert_vocab(directory, with_cjk)
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=128)


def _bert_config(vocab_size: int, **extra: object):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **extra)


def bert_embedder(directory: Path, pooling: str = "mean", normalize: bool = False,
                  dense_out: int | None = None, dense_activation: str = "Identity",
                  prompts: dict[str, str] | None = None, with_cjk: bool = True, seed: int = 0) -> Path:
    """A BERT bi-encoder saved by sentence-transformers with the modules asked for."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertModel

    torch.manual_seed(seed)
    tokenizer = _bert_tokenizer(directory / "hf", with_cjk)
    BertModel(_bert_config(len(tokenizer))).save_pretrained(directory / "hf")
    tokenizer.save_pretrained(directory / "hf")
    modules: list[object] = [models.Transformer(str(directory / "hf"), max_seq_length=64),
                             models.Pooling(32, pooling)]
    if dense_out:
        activation = getattr(torch.nn, dense_activation)()
        modules.append(models.Dense(32, dense_out, bias=True, activation_function=activation))
    if normalize:
        modules.append(models.Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts)
    model.save(str(directory / "st"))
    return directory / "st"


def bert_classifier(directory: Path, labels: list[str], seed: int = 0) -> Path:
    """A BertForSequenceClassification: one label makes it a cross-encoder, several a classifier."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = _bert_tokenizer(directory)
    config = _bert_config(len(tokenizer), num_labels=len(labels),
                          id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def xlmr_embedder(directory: Path, seed: int = 0) -> Path:
    """An XLM-RoBERTa encoder with a Unigram (sentencepiece-style) tokenizer, CLS pooling + Normalize."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from tokenizers import SentencePieceUnigramTokenizer, processors
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    torch.manual_seed(seed)
    hf = directory / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    unigram = SentencePieceUnigramTokenizer()
    corpus = probes.ENGLISH + probes.CHINESE + probes.QUERIES + [probes.long_text(200)]
    unigram.train_from_iterator(corpus * 4, vocab_size=300,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>")
    backend = unigram._tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = XLMRobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                        mask_token="<mask>", model_max_length=126)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=130, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2)
    XLMRobertaModel(config).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    model = SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=96),
                                         models.Pooling(32, "cls"), models.Normalize()], device="cpu")
    model.save(str(directory / "st"))
    return directory / "st"


def other_encoder(directory: Path, model_type: str, seed: int = 0) -> Path:
    """A tiny RoBERTa, MPNet or DistilBERT encoder with mean pooling, saved by sentence-transformers."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import (
        DistilBertConfig,
        DistilBertModel,
        DistilBertTokenizerFast,
        MPNetConfig,
        MPNetModel,
        MPNetTokenizerFast,
        RobertaConfig,
        RobertaModel,
    )

    torch.manual_seed(seed)
    hf = directory / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    if model_type == "roberta":
        tokenizer_source = xlmr_embedder(directory / "tokenizer-source", seed=seed) / ".." / "hf"
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source.resolve()))
        config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=130, pad_token_id=1)
        model = RobertaModel(config)
    elif model_type == "mpnet":
        tokenizer = MPNetTokenizerFast(vocab_file=str(write_bert_vocab(hf)), model_max_length=128)
        config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=130)
        model = MPNetModel(config)
    elif model_type == "distilbert":
        tokenizer = DistilBertTokenizerFast(vocab_file=str(write_bert_vocab(hf)), model_max_length=128)
        config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  max_position_embeddings=128)
        model = DistilBertModel(config)
    else:
        raise ValueError(model_type)
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    st = SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=64), models.Pooling(32, "mean")],
                             device="cpu")
    st.save(str(directory / "st"))
    return directory / "st"


def unsupported_model(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return directory
