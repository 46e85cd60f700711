"""Recipe loading: sectioned (or flat) YAML -> validated argparse defaults.

A recipe is a YAML file whose keys are argparse dest names (``model_ema_decay``, not
``--model-ema-decay``), optionally grouped under the sections below. Unlike timm's ``-c`` YAML,
every key is checked against the parser: an unknown key, a key given twice, a value of the wrong
type or outside ``choices`` stops the run with a message that names the file and the key.
Precedence stays timm's: command line > recipe > argparse default.
"""
import argparse
import difflib
import os
from typing import Any, Dict, Optional

import yaml

SECTIONS = ('data', 'model', 'teacher', 'distill', 'optim', 'sched', 'aug', 'ema', 'runtime')
# keys a saved args.yaml carries that are not settings of a run (the teacher's source: distillers/teacher.py)
IGNORED_KEYS = ('config',) + tuple(f'{r}_{k}' for r in ('teacher', 'model') for k in ('source', 'sha256', 'bytes',
                                                                                 'weights', 'revision'))
# what a recipe, a checkpoint's args or an export's metadata may set for validate.py / export.py
SETTING_KEYS = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'gp', 'bn_eps', 'img_size', 'input_size',
                'crop_pct', 'mean', 'std', 'interpolation')


# keys whose YAML list means a comma list: several students trained together from one teacher pass (joint.py)
LIST_KEYS = ('model', 'distiller')


class RecipeError(ValueError):
    """A recipe file that cannot be used as it is; the message says what to change."""


class _DuplicateKey(Exception):
    def __init__(self, key: Any, where: str, first: int, second: int):
        super().__init__(key, where, first, second)
        self.key, self.where, self.first, self.second = key, where, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the later value silently).

    The composed node tree is walked once before any value is built: every mapping's explicit keys are compared,
    and the mapping is named by its place ('the top level', "section 'optim'", "'model_kwargs' in section
    'model'"). Keys brought in by a YAML merge (``<<: *anchor``) may still be overridden, as YAML allows.
    """

    def construct_document(self, node):
        self._check_keys(node, (), set())
        return super().construct_document(node)

    @staticmethod
    def _where(path) -> str:
        if not path:
            return 'at the top level'
        outer = f"section '{path[0]}'" if path[0] in SECTIONS else f"'{path[0]}'"
        inner = "' in '".join(str(p) for p in reversed(path[1:]))
        return f"in '{inner}' in {outer}" if inner else f'in {outer}'

    def _check_keys(self, node, path, visited) -> None:
        if id(node) in visited:  # an alias met again (or a recursive one)
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, path + (f'item {i + 1}',), visited)
        if not isinstance(node, yaml.MappingNode):
            return
        seen = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != 'tag:yaml.org,2002:merge':
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, self._where(path), seen[key], line)
                seen[key] = line
            self._check_keys(value_node, path + (getattr(key_node, 'value', '?'),), visited)


def _actions_by_dest(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, 'help')}


def _type_name(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return 'a boolean (true/false)'
    if action.type in (int, float):
        base = 'an integer' if action.type is int else 'a number'
    else:
        base = 'a string'
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        return f'a list of {base.split(" ", 1)[1]}s'
    return base


def _coerce_scalar(value: Any, action: argparse.Action) -> Any:
    typ = action.type
    if isinstance(value, bool) and typ in (int, float):
        raise TypeError
    if typ is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value)
        raise TypeError
    if typ is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)  # PyYAML reads 5e-3 (no dot) as a string
        raise TypeError
    if typ is None or typ is str:
        if isinstance(value, (dict, list)):
            raise TypeError
        return value if value is None else (value if isinstance(value, (str, int, float)) else str(value))
    if isinstance(value, str):
        return typ(value)
    return value


def coerce_value(value: Any, action: argparse.Action) -> Any:
    """Check one recipe value against its argparse action; returns the value to use as default."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise TypeError
        return value
    if action.nargs == 0:  # store_const and friends
        return value
    if value is None:
        return None
    if isinstance(action.nargs, int) or action.nargs in ('+', '*'):
        if isinstance(value, dict):  # kwargs-style actions (timm's ParseKwargs) take a mapping
            if action.type is not None:
                raise TypeError
            return value
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise TypeError
        value = [_coerce_scalar(v, action) for v in items]
        if action.choices is not None:
            bad = [v for v in value if v not in action.choices]
            if bad:
                raise ValueError(f'{bad[0]!r} is not one of {list(action.choices)}')
        return value
    value = _coerce_scalar(value, action)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f'{value!r} is not one of {list(action.choices)}')
    return value


def read_recipe(path: str) -> Dict[str, Any]:
    """Read a recipe into {key: (section or None, value)}; checks structure, not keys."""
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file '{path}' does not exist; pass a path such as recipes/swinl_r50.yaml")
    try:
        with open(path, 'rb') as f:
            text = f.read().decode('utf-8')
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe file '{path}' is not a text file (byte {e.start} is not UTF-8); pass a YAML "
                          f"recipe such as recipes/swinl_r50.yaml") from None
    except OSError as e:
        raise RecipeError(f"recipe file '{path}' cannot be read ({e.strerror}); check its permissions") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        lines = f'line {e.first}' if e.first == e.second else f'lines {e.first} and {e.second}'
        raise RecipeError(f"recipe '{path}': key '{e.key}' is set twice {e.where} ({lines}); keep one") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file '{path}' is not valid YAML: {' '.join(str(e).split())}; fix it or pass "
                          f"a recipe such as recipes/swinl_r50.yaml") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe file '{path}' must be a mapping of keys to values, got {type(raw).__name__}; write 'key: value' lines (see recipes/swinl_r50.yaml)")
    flat: Dict[str, Any] = {}
    where: Dict[str, str] = {}
    for top, val in raw.items():
        if top in SECTIONS and isinstance(val, dict):
            items = [(k, val[k], top) for k in val]
        elif top in SECTIONS and val is None:
            items = []
        else:
            items = [(top, val, None)]
        for key, value, section in items:
            label = f"section '{section}'" if section else 'the top level'
            if key in flat:
                raise RecipeError(
                    f"recipe '{path}': key '{key}' is set twice, in {where[key]} and in {label}; keep one")
            flat[key] = value
            where[key] = label
    return {k: (where[k], v) for k, v in flat.items()}


def load_recipe(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Validate a recipe against ``parser`` and return it as a flat {dest: value} dict of defaults."""
    actions = _actions_by_dest(parser)
    out = {}
    for key, (where, value) in read_recipe(path).items():
        if key in IGNORED_KEYS:
            continue
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else '; see --help for the valid keys'
            raise RecipeError(f"recipe '{path}': unknown key '{key}' in {where}{hint}")
        if key in LIST_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ','.join(value)  # model: [a, b] trains both students (train_kd.py --model a,b)
        try:
            out[key] = coerce_value(value, action)
        except argparse.ArgumentTypeError as e:  # a type that checks its value (--distiller names)
            raise RecipeError(f"recipe '{path}': key '{key}' in {where}: {e}") from None
        except (TypeError, ValueError) as e:
            detail = str(e) if isinstance(e, ValueError) and 'not one of' in str(e) else \
                f'expects {_type_name(action)}, got {value!r} ({type(value).__name__})'
            raise RecipeError(f"recipe '{path}': key '{key}' in {where} {detail}") from None
    return out


def parse_args_with_recipe(
        parser: argparse.ArgumentParser,
        argv: Optional[list] = None,
):
    """Parse ``--config`` first, load it as defaults, then parse the rest of the command line.

    Returns (args, args_text): args_text is the YAML of the requested settings, written to args.yaml.
    """
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str)
    known, remaining = config_parser.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**load_recipe(known.config, parser))
        except RecipeError as e:
            parser.error(str(e))
    args = parser.parse_args(remaining)
    args.config = known.config
    args_text = yaml.safe_dump(vars(args), default_flow_style=False)
    return args, args_text


def run_settings(run_args: Dict[str, Any]) -> Dict[str, Any]:
    """The model / preprocessing settings of a training run, from its args (``vars(ckpt['args'])``)."""
    return {k: v for k, v in run_args.items() if k in SETTING_KEYS and v not in (None, '', {}, [])}
