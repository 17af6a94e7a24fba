from __future__ import annotations

import base64
import hashlib

from itsdangerous import Signer

from sessionstore import ids
from sessionstore.signing import CookieSigner, Verdict


def test_ids_have_256_bits_and_no_dots():
    seen = {ids.new_id() for _ in range(2000)}
    assert len(seen) == 2000
    for sid in list(seen)[:100]:
        assert len(sid) == 43 and "." not in sid
        assert len(base64.urlsafe_b64decode(sid + "=")) == 32
        assert ids.is_valid(sid)


def test_sticky_ids_carry_the_route():
    sid = ids.new_id("n1")
    assert sid.endswith(".n1") and ids.is_valid(sid)
    assert ids.split_route(sid) == (sid[:-3], "n1")
    assert ids.with_route(sid, "n2").endswith(".n2")


def test_validation_is_strict():
    good = ids.new_id()
    for bad in [good[:-1], good + "x", good + ".", good + ".n-1", good + ".a.b", " " + good[1:],
                good[:-1] + "\n", good[:-1] + "é", None, 42, good + "." + "n" * 65]:
        assert not ids.is_valid(bad), bad


def test_cookie_value_ends_with_route_and_verifies():
    signer = CookieSigner(["k"])
    sid = ids.new_id("node7")
    value = signer.sign(sid)
    assert value.endswith(".node7") and value.count(".") == 1  # first dot == last dot: every balancer
    assert value.startswith(sid.split(".")[0])
    assert signer.unsign(value) == sid


def test_signature_is_itsdangerous_hmac_sha256():
    sid = ids.new_id()
    value = CookieSigner(["k"]).sign(sid)
    expected = Signer("k", salt="sessionstore.cookie", digest_method=hashlib.sha256).get_signature(sid).decode()
    assert value == f"{sid}{expected}"


def test_route_is_signed_too():
    signer = CookieSigner(["k"])
    value = signer.sign(ids.new_id("n1"))
    assert signer.unsign(value[:-2] + "n2") is Verdict.BAD_SIGNATURE


def test_rotation_first_key_signs_all_verify():
    sid = ids.new_id()
    old = CookieSigner(["old"]).sign(sid)
    both = CookieSigner(["new", "old"])
    assert both.unsign(old) == sid
    assert both.sign(sid) == CookieSigner(["new"]).sign(sid)
    assert CookieSigner(["new"]).unsign(old) is Verdict.BAD_SIGNATURE


def test_malformed_values():
    signer = CookieSigner(["k"])
    for value in ["", "a", "a.b", "a.b.c.d", "x" * 300, "é" * 10, ids.new_id() + ".!!!",
                  "x" * 86 + ".a.b", "x" * 86 + "."]:
        assert signer.unsign(value) is Verdict.MALFORMED, value
