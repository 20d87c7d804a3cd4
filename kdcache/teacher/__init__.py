"""Stage one: run the teacher once over a dataset and store its logits (`teacher_logits`); check them (`verify`)."""
