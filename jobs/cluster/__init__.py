"""Running cotd on a cluster: resource planning (plan.py) and Ray job submission (submit.py)."""
