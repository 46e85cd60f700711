#!/usr/bin/env python3
"""Write the flag list of a timm ``train.py`` (tests/timm_train_flags.txt), read from its source.

    python tools/timm_train_flags.py PATH/TO/train.py --source 'timm vX (commit C)' > tests/timm_train_flags.txt

Every ``*.add_argument(...)`` call of the file is read with ``ast`` (nothing of it is run): one output line per
call, its option strings separated by spaces (``--decay-rate --dr``); a positional argument is written as its
name (``data``). ``tests/test_timm_train_flags.py`` checks each line against train_kd.py's parser.
"""
import argparse
import ast
import sys


def train_flags(source: str):
    """[(option strings...), ...] of every add_argument call of ``source``, in file order, without duplicates."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'add_argument':
            names = tuple(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
            if names and names not in out:
                out.append((node.lineno, names))
    return [names for _, names in sorted(out)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('train_py', help="timm's train.py")
    parser.add_argument('--source', required=True, help='where the file came from (release tag, commit)')
    args = parser.parse_args(argv)
    with open(args.train_py) as f:
        flags = train_flags(f.read())
    print(f'# The flags of timm\'s train.py: {args.source}.')
    print('# One add_argument call a line (its option strings; a positional as its name), in file order.')
    print('# Regenerate when the timm pin moves (requirements.txt), from that release\'s train.py:')
    print('#   python tools/timm_train_flags.py train.py --source "timm vX.Y.Z (commit ...)" '
          '> tests/timm_train_flags.txt')
    print('# then run tests/test_timm_train_flags.py: each new flag must be accepted or refused by name.')
    for names in flags:
        print(' '.join(names))
    return 0


if __name__ == '__main__':
    sys.exit(main())
