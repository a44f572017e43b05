import numpy as np
import pytest

from rs_pseudolabel.data.records import (
    PseudoLabel,
    content_hash,
    decode_pseudo,
    encode_pseudo,
    labeled_sample,
    read_cls,
)


def _label(k: int = 16, classes: int = 1000, embedding: np.ndarray | None = None) -> PseudoLabel:
    rng = np.random.default_rng(k)
    probs = np.sort(rng.dirichlet(np.ones(classes)))[::-1][:k]
    indices = rng.choice(classes, k, replace=False)
    return PseudoLabel(
        key="n01440764_10026",
        indices=indices,
        probs=probs.astype(np.float16),
        confidence=float(probs[0]),
        entropy=6.2,
        content_hash=content_hash(b"image bytes"),
        embedding=embedding,
    )


def test_pseudo_label_round_trips_every_field():
    label = _label()
    back = decode_pseudo(label.key, encode_pseudo(label), teacher="rs-152@ab12", source="s-0.tar")
    np.testing.assert_array_equal(back.indices, label.indices)
    np.testing.assert_array_equal(back.probs, label.probs)
    assert back.confidence == pytest.approx(label.confidence, rel=1e-3)
    assert back.entropy == pytest.approx(6.2, rel=1e-3)
    assert back.content_hash == content_hash(b"image bytes")
    assert back.embedding is None
    assert (back.teacher, back.source) == ("rs-152@ab12", "s-0.tar")


def test_top16_payload_is_at_most_80_bytes():
    assert len(encode_pseudo(_label(16))) <= 80


def test_embedding_and_wide_class_ids_round_trip():
    emb = np.random.default_rng(0).standard_normal(256).astype(np.float16)
    label = _label(k=5, classes=100_000, embedding=emb)
    label.indices[0] = 99_999
    back = decode_pseudo(label.key, encode_pseudo(label))
    assert back.indices[0] == 99_999
    np.testing.assert_array_equal(back.embedding, emb)


def test_class_index_codec_accepts_imagenet_style_and_rejects_garbage():
    assert read_cls(labeled_sample("k", "jpg", b"x", 7)) == 7
    assert read_cls({"cls": b" 42\n"}) == 42
    assert read_cls({"jpg": b"x"}) is None
    with pytest.raises(ValueError):
        read_cls({"cls": b"cat"})
    with pytest.raises(ValueError):
        read_cls({"cls": b"-3"})
