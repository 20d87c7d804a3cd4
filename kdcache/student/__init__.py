"""Stage two: train a student from the cached soft targets (`train_student`), with the losses of kdcache.student.loss."""
