"""Stage three: measure students and teachers on a split (`evaluate_models`), with offline metrics and plots."""
