"""tpllama"""
