"""embedforge.modules"""
