"""The ``where:``/``when:`` expression language: what it evaluates, and what it refuses."""

from __future__ import annotations

import pytest

from obsflow.registry.expression import ExpressionError, parse


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"exptime": 60, "filter": "R"}, True),
        ({"exptime": 60, "filter": "I"}, True),
        ({"exptime": 60, "filter": "B"}, False),
        ({"exptime": 30, "filter": "R"}, False),
        ({"exptime": 30.5, "filter": "R"}, True),
        ({"filter": "R"}, False),  # exptime missing
        ({"exptime": 60}, False),  # filter missing
    ],
)
def test_comparison_and_membership(values: dict[str, object], expected: bool) -> None:
    expr = parse("exptime > 30 and filter in ['R','I']")
    assert expr.evaluate(values) is expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"frame_type": "FLAT", "filter": "R", "group.filter": "R"}, True),
        ({"frame_type": "FLAT", "filter": "R", "group.filter": "V"}, False),
        ({"frame_type": "BIAS", "filter": "R", "group.filter": "R"}, False),
        ({"frame_type": "FLAT", "filter": "R"}, False),  # the group has no filter
    ],
)
def test_dotted_names_read_dotted_keys(values: dict[str, object], expected: bool) -> None:
    expr = parse("frame_type == 'FLAT' and filter == group.filter")
    assert expr.evaluate(values) is expected


def test_names_lists_every_dotted_name_read() -> None:
    expr = parse("frame_type == 'FLAT' and filter == group.filter")
    assert expr.names == frozenset({"frame_type", "filter", "group.filter"})
    assert parse("a.b.c == 1 or not d").names == frozenset({"a.b.c", "d"})
    assert parse("'x' == 'x'").names == frozenset()


def test_not_or_and_parentheses() -> None:
    expr = parse("not (object == 'bias')")
    assert expr.evaluate({"object": "M31"}) is True
    assert expr.evaluate({"object": "bias"}) is False
    either = parse("filter == 'R' or filter == 'I'")
    assert either.evaluate({"filter": "I"}) is True
    assert either.evaluate({"filter": "V"}) is False
    assert parse("not exptime > 30 and filter == 'R'").evaluate({"exptime": 10, "filter": "R"})


def test_other_comparisons_literals_and_chains() -> None:
    assert parse("frame_type != 'BIAS'").evaluate({"frame_type": "FLAT"}) is True
    assert parse("exptime <= 30").evaluate({"exptime": 30}) is True
    assert parse("exptime >= 30").evaluate({"exptime": 29.9}) is False
    assert parse("exptime < 30").evaluate({"exptime": 29}) is True
    assert parse("filter not in ('R', 'I')").evaluate({"filter": "B"}) is True
    assert parse("dec > -30").evaluate({"dec": -10.5}) is True
    assert parse("1 < exptime < 10").evaluate({"exptime": 5}) is True
    assert parse("1 < exptime < 10").evaluate({"exptime": 50}) is False
    assert parse("flag == True").evaluate({"flag": True}) is True
    assert parse("program == None").evaluate({}) is True
    assert parse("  exptime > 1  ").evaluate({"exptime": 2}) is True  # surrounding blanks


@pytest.mark.parametrize("text", ["exptime > 30", "exptime < 30", "exptime >= 0", "exptime <= 0"])
def test_a_missing_name_never_satisfies_an_order_comparison(text: str) -> None:
    expr = parse(text)
    assert expr.evaluate({}) is False
    assert expr.evaluate({"exptime": None}) is False


def test_a_missing_name_is_none() -> None:
    assert parse("filter == None").evaluate({}) is True
    assert parse("filter != 'R'").evaluate({}) is True
    assert parse("filter in ['R', 'I']").evaluate({}) is False
    assert parse("not (exptime > 30)").evaluate({}) is True


def test_mismatched_types_do_not_satisfy_an_order_comparison() -> None:
    assert parse("exptime > 30").evaluate({"exptime": "long"}) is False


def test_unary_minus_of_a_missing_name_is_false_not_a_crash() -> None:
    expr = parse("-exptime < -30")
    assert expr.evaluate({"exptime": 40}) is True
    assert expr.evaluate({}) is False


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("__import__('os')", "Call is not allowed"),
        ("os.system('rm -rf /') == 0", "Call is not allowed"),
        ("len(filter) > 1", "Call is not allowed"),
        ("'abc'.upper == 'ABC'", "Attribute is not allowed"),
        ("filter[0] == 'R'", "Subscript is not allowed"),
        ("(lambda: 1) == 1", "Lambda is not allowed"),
        ("[x for x in filters] == []", "ListComp is not allowed"),
        ("{x for x in filters} == 1", "SetComp is not allowed"),
        ("(x for x in filters) == 1", "GeneratorExp is not allowed"),
        ("f'{filter}' == 'R'", "JoinedStr is not allowed"),
        ("exptime ** 2 > 30", "operator Pow is not allowed"),
        ("exptime << 2 > 30", "operator LShift is not allowed"),
        ("'R' if x else 'I'", "IfExp is not allowed"),
        ("(x := 1) == 1", "NamedExpr is not allowed"),
        ("{'a': 1} == x", "Dict is not allowed"),
        ("~x == 1", "UnaryOp is not allowed"),
        ("filter is None", "operator Is is not allowed"),
        ("b'R' == filter", "literal b'R' is not allowed"),
        ("... == filter", "literal Ellipsis is not allowed"),
    ],
)
def test_refused_constructs_say_what_is_not_allowed(text: str, what: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(text)
    assert what in str(caught.value)
    assert repr(text) in str(caught.value)  # the message quotes the offending expression


@pytest.mark.parametrize("text", ["exptime >", "", "x = 1", "x; y", "(exptime > 3"])
def test_syntax_errors_are_refused(text: str) -> None:
    with pytest.raises(ExpressionError, match="cannot parse expression"):
        parse(text)


def test_expression_error_is_a_value_error() -> None:
    # pydantic turns a ValueError raised in a validator into a located validation error
    assert issubclass(ExpressionError, ValueError)


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ("ITIME * COADDS", {"ITIME": 2.5, "COADDS": 4}, 10.0),
        ("(a + b) / 2 - c % 3 + d // 2", {"a": 1, "b": 3, "c": 5, "d": 7}, 3.0),
        ("grating + '/' + slit", {"grating": "600", "slit": "1.0"}, "600/1.0"),
        ("ITIME * COADDS", {"ITIME": 2.5}, None),
        ("ITIME * COADDS", {"ITIME": "2.5", "COADDS": 4}, None),
        ("'ab' * n", {"n": 10**9}, None),
        ("x / y", {"x": 1, "y": 0}, None),
        ("flag + 1", {"flag": True}, None),
    ],
)
def test_arithmetic_values_and_their_missing_operands(
    text: str, values: dict[str, object], expected: object
) -> None:
    assert parse(text).value(values) == expected


def test_arithmetic_in_a_condition() -> None:
    assert parse("exptime * coadds > 30").evaluate({"exptime": 10, "coadds": 4})
    assert not parse("exptime * coadds > 30").evaluate({"exptime": 10})
