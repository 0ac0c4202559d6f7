"""Placeholder: being written."""


def load_torch_state_dict(name, state_dict):
  raise NotImplementedError
