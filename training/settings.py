"""All of a run's settings in one object, and the one command-line parser every script uses.

Settings come from config.py's dataclass defaults, then a preset (or, on --resume, the run's saved settings),
then the command line. On the command line every setting is accepted as `--name=value`, `--name value`,
with hyphens (`--noise-std=0.2`) and section-qualified (`--growth.noise_std=0.2`); a boolean alone means true.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import io
import json
import os
import tokenize
from dataclasses import MISSING, dataclass, fields, replace

import torch

from common.files import write_atomic
from config import PRESETS, ConfigError, DataConfig, GrowthConfig, ModelConfig, RunConfig, TrainConfig, config_to_dict

SECTIONS: dict[str, type] = {"run": RunConfig, "growth": GrowthConfig, "model": ModelConfig, "train": TrainConfig,
                             "data": DataConfig}
# Phase 1 is dense: its model's MoE fields are not settings (the MoE's come from --n_experts / --top_k, growth's).
NOT_SETTINGS = {("model", "n_experts"), ("model", "top_k")}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

Overrides = dict[str, dict[str, object]]  # section -> {field: typed value}


@dataclass
class Settings:
    run: RunConfig
    growth: GrowthConfig
    model: ModelConfig  # the phase-1 dense model
    train: TrainConfig
    data: DataConfig

    def to_dict(self) -> dict:
        return {s: config_to_dict(getattr(self, s)) for s in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """Settings saved by any version: fields that no longer exist are dropped, new ones take defaults."""
        def known(section: str) -> dict:
            names = {f.name for f in fields(SECTIONS[section])}
            return {k: v for k, v in d.get(section, {}).items() if k in names}

        return cls(**{s: SECTIONS[s](**known(s)) for s in SECTIONS})


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    annotation: str  # e.g. "int", "float", "int | None"
    default: object
    doc: str  # config.py's comment on the field

    @property
    def qualified(self) -> str:
        return f"{self.section}.{self.name}"


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in config.py: the one on its line, else the first line of the block just above."""
    source = inspect.getsource(cls)
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line, above = node.lineno, node.lineno - 1
            while above - 1 in comments:
                above -= 1
            docs[node.target.id] = comments.get(line) or comments.get(above, "")
    return docs


def settings_table() -> list[Setting]:
    """Every setting a user can give, in config.py's order, with its default and one line of doc."""
    table = []
    for section, cls in SECTIONS.items():
        docs = _field_docs(cls)
        for f in fields(cls):
            if (section, f.name) not in NOT_SETTINGS:
                default = f.default if f.default is not MISSING else f.default_factory()
                table.append(Setting(section, f.name, str(f.type), default, docs.get(f.name, "")))
    return table


def find_setting(name: str, table: list[Setting] | None = None) -> Setting:
    """The setting `name` (plain, hyphenated or section-qualified) means; ConfigError if unknown or ambiguous."""
    table = table or settings_table()
    key = name.replace("-", "_")
    section, _, field_name = key.rpartition(".")
    if section and section not in SECTIONS:
        raise ConfigError(f"unknown section in --{name}; sections: {', '.join(SECTIONS)}")
    if section and (section, field_name) in NOT_SETTINGS:
        raise ConfigError(f"--{name} is not a setting: phase 1 is dense; set the MoE with --growth.{field_name}")
    owners = [s for s in table if s.name == field_name and (not section or s.section == section)]
    if len(owners) > 1:
        raise ConfigError(f"--{name} is ambiguous: it is a setting of {len(owners)} sections; write "
                          + " or ".join(f"--{s.qualified}" for s in owners))
    if not owners:
        names = sorted({s.qualified if section else s.name for s in table})
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.75)
        hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else "--help lists every setting"
        raise ConfigError(f"unknown setting --{name}; {hint}")
    return owners[0]


def convert(raw: str, setting: Setting):
    """raw parsed to the setting's type (nanoGPT's rule: no type changes); ConfigError naming the setting."""
    types = [t.strip() for t in setting.annotation.split("|")]
    if "None" in types and raw.lower() in ("none", "null"):
        return None
    kind = types[0]
    if kind == "bool":
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"--{setting.name}={raw}: expected true or false")
    if kind in ("int", "float"):
        try:
            return int(raw) if kind == "int" else float(raw)
        except ValueError:
            what = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"--{setting.name}={raw}: expected {what}{' or none' if 'None' in types else ''}") from None
    return raw


def parse_overrides(tokens: list[str]) -> Overrides:
    """--name=value / --name value / --flag (booleans) tokens -> typed values per section."""
    table, out, i = settings_table(), {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: settings are written --name=value or --name value")
        name, eq, raw = tok[2:].partition("=")
        setting = find_setting(name, table)
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if not eq:
            if setting.annotation == "bool" and (nxt is None or nxt.lower() not in _TRUE + _FALSE):
                raw = "true"
            elif nxt is None or nxt.startswith("--"):
                raise ConfigError(f"--{name} needs a value: --{name}=VALUE or --{name} VALUE")
            else:
                raw, i = nxt, i + 1
        out.setdefault(setting.section, {})[setting.name] = convert(raw, setting)
        i += 1
    return out


def settings_help() -> str:
    """Every setting grouped by section, with its default and doc (the second half of --help)."""
    lines = ["settings (config.py; --name=value, --name value, --name-with-hyphens, or --section.name):"]
    table = settings_table()
    for section, cls in SECTIONS.items():
        rows = [s for s in table if s.section == section]
        lines.append(f"\n  {section}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}".rstrip())
        width = max(len(s.name) for s in rows) + 2
        for s in rows:
            lines.append(f"    --{s.name:<{width}} {str(s.default):<12} {s.doc}".rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the parser
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigError (one line, exit 2 by the caller) instead of usage + exit."""

    def error(self, message: str):
        raise ConfigError(message)


def make_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser for a script's own options; parse_command_line adds the settings and --help."""
    parser = OneLineParser(description=description, epilog=epilog, add_help=False, allow_abbrev=False,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", help="show this help, every setting included, and exit")
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, Overrides]:
    """(the script's own options, the settings); options too take hyphens or underscores. --help prints both
    and exits 0; bad input raises ConfigError before any work."""
    if "-h" in argv or "--help" in argv:
        print(parser.format_help().rstrip() + "\n\n" + settings_help())
        raise SystemExit(0)
    options = {o for a in parser._actions for o in a.option_strings}
    argv = [_option_spelling(tok, options) for tok in argv]
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


def _option_spelling(token: str, options: set[str]) -> str:
    """--data_files -> --data-files when the script's option is spelled with hyphens (and vice versa)."""
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    for spelling in (name.replace("_", "-"), name.replace("-", "_")):
        if spelling in options:
            return spelling + eq + value
    return token


# ------------------------------------------------------------------------------------------ building
def default_preset() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def place(flat: dict[str, object]) -> Overrides:
    """{name: value} (a preset's, or a benchmark's) placed in the sections that own the names."""
    out: Overrides = {}
    table = settings_table()
    for name, value in flat.items():
        setting = find_setting(name, table)
        out.setdefault(setting.section, {})[setting.name] = value
    return out


def preset_overrides(preset: str) -> Overrides:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return place(PRESETS[preset])


def apply(settings: Settings, overrides: Overrides) -> Settings:
    """settings with overrides applied, each section validated as it is rebuilt."""
    return Settings(**{s: replace(getattr(settings, s), **overrides.get(s, {})) for s in SECTIONS})


def merge_overrides(*layers: Overrides) -> Overrides:
    """Later layers win, field by field."""
    out: Overrides = {}
    for layer in layers:
        for section, values in layer.items():
            out.setdefault(section, {}).update(values)
    return out


def build_settings(preset: str | None, overrides: Overrides | None = None, saved: dict | None = None) -> Settings:
    """Defaults <- preset (None: config.py's defaults) or the saved run's settings <- overrides, validated together."""
    overrides = overrides or {}
    if saved is not None:
        base = Settings.from_dict(saved)
        fixed = {"model": "the model", "data": "the data", "run.seed": "the seed (data split, batch order, noise)"}
        for key, what in fixed.items():
            section, _, name = key.partition(".")
            given = {k: v for k, v in overrides.get(section, {}).items() if not name or k == name}
            if given:
                given = " ".join(f"--{k}={v}" for k, v in given.items())
                raise ConfigError(f"{given}: {what} of an existing run cannot change on --resume; start a new run in "
                                  "another --out-dir")
    else:
        base = Settings(**{s: cls() for s, cls in SECTIONS.items()})
        if preset is not None:
            base = apply(base, preset_overrides(preset))
    settings = apply(base, overrides)
    check_consistency(settings)
    return settings


def check_consistency(s: Settings) -> None:
    """Rules that span sections, reported together."""
    p = []
    if s.train.seq_len > s.model.max_seq_len:
        p.append(f"seq_len={s.train.seq_len} exceeds max_seq_len={s.model.max_seq_len}")
    if s.model.n_experts:
        p.append(f"n_experts={s.model.n_experts} in the model: phase 1 is dense; set the MoE with --n_experts (growth)")
    if s.model.vocab_size < 257:
        p.append(f"vocab_size={s.model.vocab_size} must be >= 257 (byte-level BPE: 256 bytes + end of text)")
    if s.model.vocab_size > 65536:
        p.append(f"vocab_size={s.model.vocab_size} must be <= 65536 (tokens are cached as uint16)")
    if p:
        raise ConfigError("; ".join(p))


def save_settings(settings: Settings, out_dir: str) -> None:

    write_atomic(os.path.join(out_dir, "settings.json"), json.dumps(settings.to_dict(), indent=1))


def load_saved_settings(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, "settings.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def with_hf_model(s: Settings, path: str, overrides: Overrides) -> Settings:
    """Settings whose phase-1 model is the transformers checkpoint's (ConfigError if it cannot be used: an
    unreadable or unsupported model, an MoE, or a tokenizer with more tokens than the model's embedding has rows)."""
    from data.text import DataError
    from data.tokenizer import load_tokenizer
    from transfer.hf_format import UnsupportedModel, hf_family, read_hf_config, refuse_code_in_weights

    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"--init-from-hf {path}: not a transformers model directory (no config.json)")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise ConfigError(f"--init-from-hf {path}: no tokenizer.json beside the model; save its fast tokenizer there")
    if overrides.get("model"):
        clash = " ".join(f"--{k}={v}" for k, v in overrides["model"].items())
        raise ConfigError(f"{clash}: the model comes from --init-from-hf and cannot be changed")
    try:
        family = hf_family(path)
        cfg = read_hf_config(path)
        refuse_code_in_weights(path)
        tokens = len(load_tokenizer(path))
    except (UnsupportedModel, DataError, OSError, ValueError) as e:
        raise ConfigError(f"--init-from-hf {path}: {e}") from None
    if cfg.is_moe:
        raise ConfigError(f"--init-from-hf {path}: a {family} (MoE) model; phase 1 needs a dense model "
                          "(llama, mistral, qwen2 or qwen3)")
    if tokens > cfg.vocab_size:  # ids past the embedding's rows would crash the first forward, after tokenizing
        raise ConfigError(f"--init-from-hf {path}: its tokenizer has {tokens:,} tokens but the model's embedding "
                          f"only {cfg.vocab_size:,} rows (vocab_size); save the tokenizer the model was trained with")
    settings = replace(s, model=cfg)
    if settings.train.seq_len > cfg.max_seq_len:
        settings = replace(settings, train=replace(settings.train, seq_len=cfg.max_seq_len))
    check_consistency(settings)
    return settings


@dataclass
class RunRequest:
    """What the command line asks for, validated."""

    settings: Settings
    out_dir: str
    data_files: list[str] | None = None
    resume: bool = False
    init_from_hf: str | None = None  # a fresh run's phase-1 model and tokenizer
    origin: str = "auto"  # the data source a resume must read again (data.source.resume_source)
    preset: str | None = None  # the preset a fresh run started from (the report shows settings that differ)
    dataset: str | None = None  # a prepared dataset directory (data.prepared), instead of data_files or the hub
