"""Keys the upstream echoes in an error body never reach the client or a transcript."""

from hypothesis import given
from hypothesis import strategies as st

from fwd.masking import KeyMasker
from fwd.settings import mask

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrSt1234"


def test_a_key_quoted_in_an_error_body_is_masked():
    body = f'{{"error": {{"message": "Incorrect API key provided: {KEY}."}}}}'.encode()
    masked = KeyMasker([KEY]).whole(body)
    assert KEY.encode() not in masked and mask(KEY).encode() in masked


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8), st.binary(max_size=40))
def test_a_key_cut_anywhere_across_chunks_is_masked_and_nothing_else_changes(cuts, filler):
    body = filler + b"key " + KEY.encode() + b" and " + KEY.encode() + filler
    masker = KeyMasker([KEY, "sk-other-client-key-0000000001"])
    pieces, at = [], 0
    for cut in sorted(set(cuts)):
        pieces.append(body[at:cut])
        at = max(at, cut)
    pieces.append(body[at:])
    out = b"".join(masker.feed(piece) for piece in pieces) + masker.close()
    assert out == body.replace(KEY.encode(), mask(KEY).encode())


def test_without_keys_bytes_pass_untouched():
    masker = KeyMasker([])
    assert masker.feed(b"abc") == b"abc" and masker.close() == b""
