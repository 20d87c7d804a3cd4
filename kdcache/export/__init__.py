"""Stage three: ship the student (`kdcache export`): an ONNX folder that ONNX Runtime runs, int8 when asked,
checked against the PyTorch student, the cached teacher and the labels (kdcache.export.run).

The package is itself the function, so that `kdcache.export(student, output, ...)` reads as `kdcache.train_student`
does: Python binds a subpackage to its name on the parent package once it is imported, which would hide a function
`kdcache.export`; calling the package calls kdcache.export.run.export."""

import sys
import types

from kdcache.export.run import export


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
