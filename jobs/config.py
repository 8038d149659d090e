"""Entry-point configs: a frozen dataclass, overridden by a YAML file, overridden by CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from pipeline.errors import UserError

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}
# Keys renamed so that "reference" means one thing: {config class: {old key: new key}}. Used only
# to say so when a config still has an old key (`build`).
RENAMED_KEYS = {
    "IterateConfig": {"reference": "ref_model", "reference_stage": "precompute"},
    "BYODConfig": {"reference_stage": "precompute"},
    "DPOConfig": {"reference": "ref_logps", "reference_model": "ref_model"},
    "PrecomputeConfig": {"reference_cache": "cache"},
}


# List fields: {annotation: element type}. YAML gives a list; a flag takes comma-separated
# values. `str|list[str]` is one name or a list of them (`loss_type`).
_LISTS = {"list[str]": str, "list[float]": float, "str|list[str]": str}


def _field_kind(f: dataclasses.Field) -> tuple[str, bool]:
    """('int' | 'float' | 'str' | 'bool' | a `_LISTS` key | dataclass name, optional?) of a
    field's annotation."""
    ann = str(f.type).replace("typing.", "").replace(" ", "")
    if ann.startswith("Optional["):
        return ann[len("Optional["):-1], True
    if ann.endswith("|None"):
        return ann.removesuffix("|None"), True
    return ann, False


class _ListChoices(tuple):
    """A flag's choices that also hold a list of them (argparse tests `value in choices`)."""

    def __contains__(self, value) -> bool:
        if isinstance(value, list):
            return all(tuple.__contains__(self, v) for v in value)
        return tuple.__contains__(self, value)


def _comma_list(kind: str, choices: tuple | None):
    """argparse `type` of a list field: comma-separated values, each checked against
    `choices`; for `str|list[str]` one value stays a string."""
    convert = _LISTS[kind]

    def parse(text: str):
        values = [convert(v.strip()) for v in text.split(",")]
        for v in values:
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice: {v!r} (choose from {', '.join(map(repr, choices))})")
        return values[0] if kind == "str|list[str]" and len(values) == 1 else values

    parse.__name__ = kind  # what argparse names in "invalid <type> value"
    return parse


def _nested(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    return t if dataclasses.is_dataclass(t) else None


def field_comments(cls) -> dict[str, str]:
    """Each field's comment in the class source, which says its unit, meaning and why its
    default: the comment on the field's line plus the comment-only lines below it that continue
    it (starting in lower case), or the comment-only lines just above the field (a field without
    a comment of its own, or a note that starts a sentence, put after the field's comment)."""
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    field_at: dict[int, str] = {}  # line -> field defined there
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        line = tok.start[0]
        if tok.type == tokenize.COMMENT:
            comments[line] = tok.string.lstrip("#").strip()
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            field_at.setdefault(line, tok.string)
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT):
            code_lines.add(line)
    out: dict[str, str] = {}
    pending: list[str] = []  # comment-only lines since the last field
    last: str | None = None  # the last field, if it had its own comment
    for line in range(1, len(source.splitlines()) + 1):
        if line in field_at:
            name, prev = field_at[line], last
            if line in comments:
                out[name], last = comments[line], name
                # Lower-case lines continue the last field's comment; from the first line that
                # starts a sentence on, they are a note about this field.
                cut = next((i for i, c in enumerate(pending) if c[:1].isupper()), len(pending))
                if prev is not None and cut:
                    out[prev] += " " + " ".join(pending[:cut])
                if pending[cut:]:
                    out[name] += ("" if out[name].endswith(".") else ".") + " " + " ".join(
                        pending[cut:])
            else:
                out[name], last = " ".join(pending), None
            pending = []
        elif line in comments and line not in code_lines:
            pending.append(comments[line])
    if last is not None and pending:
        out[last] += " " + " ".join(pending)
    return {k: v for k, v in out.items() if v}


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "",
                       choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """One `--flag` per field (nested dataclass fields as `--engine-dtype` etc.), its help the
    field's comment (`field_comments`: unit, meaning, why the default) and its default.

    `choices` ({dotted field name: allowed values}) names the constants the code validates a
    field against, so that argparse lists them in the help and refuses anything else up front.
    """
    comments = field_comments(cls)
    choices = choices or {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        sub = _nested(cls, f)
        if sub is not None:
            add_dataclass_args(parser, sub, prefix=f"{name}.", choices=choices)
            continue
        kind, _ = _field_kind(f)
        if kind == "dict":  # a section of another entry point's config: YAML only
            continue
        flag = "--" + name.replace(".", "-").replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory()
        )
        said = "required: flag or config file" if required else f"default: {default}"
        help_ = f"{comments.get(f.name, '')} ({said})".strip().replace("%", "%%")
        kw = {"dest": name, "default": argparse.SUPPRESS, "help": help_}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind in _LISTS:
            allowed = choices.get(name)
            parser.add_argument(
                flag, type=_comma_list(kind, allowed), **kw,
                **({"choices": _ListChoices(allowed)} if allowed else {"metavar": "X,Y,..."}))
        elif name in choices:
            parser.add_argument(flag, choices=choices[name], **kw)
        else:
            parser.add_argument(flag, type=_SCALARS.get(kind, str), metavar=kind.upper(), **kw)
    if not prefix and set(choices) - _dotted_fields(cls):  # a renamed field: say so, not skip
        raise ValueError(f"choices for no field of {cls.__name__}: "
                         f"{sorted(set(choices) - _dotted_fields(cls))}")


def _dotted_fields(cls, prefix: str = "") -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):
        sub = _nested(cls, f)
        names |= _dotted_fields(sub, f"{prefix}{f.name}.") if sub else {prefix + f.name}
    return names


def _check_type(cls_name: str, key: str, value, kind: str, optional: bool, source: str):
    if value is None and optional:
        return value
    if kind in _LISTS:
        if kind == "str|list[str]" and isinstance(value, str):
            return value
        element = _LISTS[kind]
        if isinstance(value, (list, tuple)):
            try:
                return [_check_type(cls_name, key, v, element.__name__, False, source)
                        for v in value]
            except UserError:
                pass
        what = f"{element.__name__} or a list of them" if kind == "str|list[str]" else kind
        raise UserError(f"{source}: {key} must be {what}{' or null' if optional else ''}, "
                        f"got {type(value).__name__} {value!r}")
    expected = _SCALARS[kind]
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UserError(
            f"{source}: {key} must be {kind}{' or null' if optional else ''}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def build(cls, values: dict, source: str, prefix: str = ""):
    """Instantiate `cls` from a flat-or-nested dict, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    renamed = RENAMED_KEYS.get(cls.__name__, {})
    for old in unknown:
        if old in renamed:
            raise UserError(f"{source}: {prefix + old} is now {prefix + renamed[old]}")
    if unknown:
        raise UserError(
            f"{source}: unknown key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"valid: {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        sub = _nested(cls, f)
        if sub is not None:
            v = values.get(name, {})
            if not isinstance(v, dict):
                raise UserError(f"{source}: {prefix + name} must be a mapping")
            kwargs[name] = build(sub, v, source, prefix=f"{prefix}{name}.")
        elif name in values:
            kind, optional = _field_kind(f)
            kwargs[name] = _check_type(
                cls.__name__, prefix + name, values[name], kind, optional, source
            )
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            flag = "--" + (prefix + name).replace(".", "-").replace("_", "-")
            raise UserError(f"{source}: {prefix + name} is required (set {flag})")
    return cls(**kwargs)


def build_section(cls, values: dict, fixed: dict, name: str, owner: str,
                  defaults: dict | None = None):
    """A stage config from section `name` of a pipeline config (`owner`: iterate, byod): its
    `defaults`, then the section's `values`, then the values the pipeline sets itself (`fixed`,
    which the section may not set)."""
    clash = sorted(set(values) & set(fixed))
    if clash:
        raise UserError(f"{name}: {clash} are set by {owner} itself; remove them from the config")
    return build(cls, {**(defaults or {}), **values, **fixed}, f"{owner} config section '{name}'")


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of config keys")
    return data


def from_args(cls, args: argparse.Namespace, section: str | None = None):
    """Config from `--config FILE` (optionally its `section:`), then explicit flags on top."""
    values: dict = {}
    source = "command line"
    if getattr(args, "config", None):
        data = load_yaml(args.config)
        values = data.get(section, data) if section else data
        source = args.config
    known = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k.split(".")[0] in known}
    for key, v in flags.items():
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return build(cls, values, source)
