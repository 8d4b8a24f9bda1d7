"""`cotd experiment`: train and evaluate variants of one distillation setup and tabulate each
variant's effect with its interval, the teacher's chains and unchanged evaluations reused."""
