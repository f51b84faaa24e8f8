"""The one exception type mtpnb raises for bad input: its message is one line saying what was
wrong and what to do; the magics, the CLI, the widgets and the server show it as it is."""


class MTPNBError(ValueError):
    pass
