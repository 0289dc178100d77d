"""The Streamlit floor of the desk (``bench --browser``): the page's shape, no work at all.

As many sidebar number inputs as a scenario has knobs, Keras's epsilon among them, a
headline that echoes it, the address bar following it, and the page's tabs: what
Streamlit and Chromium alone take on this machine to answer a widget change and to open
a fresh page. Run by the bench with ``streamlit run bnexplore/page/floor_app.py``.
"""

import streamlit as st

from bnexplore.scenario.params import PARAMS, TABS

st.set_page_config(page_title="bnexplore · the Streamlit floor", layout="wide")
with st.sidebar:
    for param in PARAMS:
        st.number_input(param.key, value=1e-3, format="%.4g", key=f"w_{param.key}")
eps = f"{st.session_state['w_keras_eps']:.4g}"
st.title("The Streamlit floor")
st.subheader(f"Keras eps = {eps}")
st.query_params["keras_eps"] = eps
for tab in st.tabs(list(TABS.values())):
    with tab:
        st.caption("Nothing computed.")
