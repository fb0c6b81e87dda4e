"""embedforge.compress"""
