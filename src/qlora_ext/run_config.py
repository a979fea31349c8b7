"""Run config files for `qlora-ext train`: `-c run.yaml` holds any of the command's flags by
name (`seq-len` or `seq_len`); the command line overrides the file, the file overrides the
defaults.  Each run writes its effective settings to `--out`/run.yaml, and `--resume DIR`
reads DIR/run.yaml back the same way (as a file below any -c file and the command line).

The file is checked against the parser itself, so a new flag is a valid key at once: an
unknown key, a value of the wrong type or outside the flag's choices is a ValueError
naming the file and the key."""
from __future__ import annotations

import argparse
import os

RUN_FILE = "run.yaml"
# flags that describe this invocation, not the run
_NOT_IN_FILES = {"help", "config", "resume", "out", "quiet", "trace", "plot", "threads"}


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise ValueError(f"no subcommand {command!r}")


def _check(path: str, key: str, value, action: argparse.Action):
    """The value as the flag would hold it, or ValueError naming the key."""
    where = f"{path}: key {key!r}"
    if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x: the value itself
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, (argparse._StoreConstAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return action.const if value else None
    kind = action.type or str
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; the flag would take it
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:  # a parsing function: give it the text, as the command line would
        try:
            value, ok = kind(str(value)), True
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{where}: {e}") from None
    if not ok:
        raise ValueError(f"{where}: expected {getattr(kind, '__name__', 'a value')}, got "
                         f"{type(value).__name__} {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def read_run_config(path, parser: argparse.ArgumentParser) -> dict:
    """{dest: value} from a YAML mapping of `parser`'s flags (null: leave the default)."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise OSError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_IN_FILES and a.option_strings}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise ValueError(f"{path}: unknown key {key!r}; expected flag names of `{parser.prog}` such as "
                             f"{', '.join(sorted(actions)[:4])}")
        if value is not None:
            values[dest] = _check(path, str(key), value, actions[dest])
    return values


def write_run_config(path, settings: dict) -> None:
    """settings {dest: value} as YAML (atomically: a temp file renamed)."""
    import yaml

    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# effective settings of this run: `qlora-ext train -c run.yaml` repeats it, "
                "`--resume DIR` continues it\n")
        yaml.safe_dump(settings, f, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)


def apply_run_configs(parser: argparse.ArgumentParser, args, argv):
    """Re-parse `argv` with the run files as defaults: `--resume DIR`'s run.yaml, then the -c
    file over it; flags given on the command line still win.  Returns the new args."""
    config, resume = getattr(args, "config", None), getattr(args, "resume", None)
    if not config and not resume:
        return args
    sub = _subparser(parser, args.command)
    values = {}
    if resume:
        saved = os.path.join(resume, RUN_FILE)
        if os.path.isfile(saved):
            values.update(read_run_config(saved, sub))
    if config:
        values.update(read_run_config(config, sub))
    # one member of a mutually exclusive group given on the command line replaces the file's
    for group in sub._mutually_exclusive_groups:
        if any(getattr(args, a.dest, None) not in (None, a.default) for a in group._group_actions):
            for a in group._group_actions:
                values.pop(a.dest, None)
    sub.set_defaults(**values)
    return parser.parse_args(argv)
