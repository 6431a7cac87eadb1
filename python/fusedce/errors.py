"""The exceptions of fusedce's argument checks. torch raises RuntimeError (or NotImplementedError) for
many of the inputs it rejects, where Python's convention is ValueError or TypeError: each exception
here is both, so code written to catch torch's exceptions, or Python's, catches fusedce's."""


class InvalidArgument(ValueError, RuntimeError):
    """A shape, device or option value the loss cannot take."""


class UnsupportedDType(TypeError, NotImplementedError):
    """A dtype the loss cannot take (NotImplementedError is a RuntimeError)."""
