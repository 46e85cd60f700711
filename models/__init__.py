"""Model-side knowledge: stage taps, teacher tails and registered model variants."""
from . import demo  # noqa: F401  (registers the demo models with timm)
from . import students  # noqa: F401
from .features import StudentTaps, forward_student, forward_teacher, resolve_student_taps
from .tails import TeacherTail
