"""Experiment configs: `get_config()` in each file returns an ml_collections ConfigDict.

A field that may be None is declared with its type `T | None` (T: int, float or
str): `config_dict.placeholder(float | None)`, or `FieldReference(value,
field_type=str | None)`. On the command line `--config.<key>=None` sets such a
field back to None and any other value parses as T; a field of plain type never
takes None. Every config file imports this package, so the parsers below are
registered before config_flags picks the parser of an override.
"""
from absl import flags
from ml_collections import config_flags


class _NoneOr(flags.ArgumentParser):
  """`None` -> None, anything else as `parser` parses it."""

  def __init__(self, parser: flags.ArgumentParser):
    self.parser = parser

  def parse(self, argument):
    return None if argument is None or argument == "None" else self.parser.parse(argument)

  def flag_type(self) -> str:
    return f"{self.parser.flag_type()} or None"


for _type, _parser in ((int, flags.IntegerParser()), (float, flags.FloatParser()),
                       (str, flags.ArgumentParser())):
  config_flags.register_flag_parser_for_type(_type | None, _NoneOr(_parser))
