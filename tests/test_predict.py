"""predict(): centering with the training means, unseen factor levels, dicts, population level."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import torchmix as tm

from conftest import sleepstudy_three_level, sleepstudy_weighted


@pytest.fixture(scope="module")
def centred():
    df = sleepstudy_weighted()
    df["age"] = 20.0 + (df["Subject"].astype(int) % 7) + 0.1 * df["Days"]
    res = tm.mix("Reaction ~ Days + age + (1 + Days | Subject)", df, weights=["w1", "w2"],
                 center_group={"Subject": ["Days"]}, center_grand=["age"], progress=False)
    return df, res


def test_predict_on_training_rows_equals_fitted_with_centering(centred):
    df, res = centred
    np.testing.assert_allclose(res.predict(df).to_numpy(), res.fitted().to_numpy(), rtol=1e-12)
    # the caller's data stay uncentred
    assert df["Days"].min() == 0


def test_predict_uses_training_means_not_newdata_means(centred):
    df, res = centred
    one = df.iloc[[5]]
    np.testing.assert_allclose(res.predict(one).to_numpy(), res.fitted().to_numpy()[[5]], rtol=1e-12)


def test_centering_new_group_needs_allow_new_levels(centred):
    df, res = centred
    new = df[df["Subject"] == "308"].assign(Subject="999")
    with pytest.raises(tm.DataError, match="not seen in fitting"):
        res.predict(new)
    pred = res.predict(new, allow_new_levels=True)
    rows = df[df["Subject"] == "308"]
    pop = res.predict(rows, include_random=False)
    # the new group is centred at its own unweighted mean, subject 308 at its weighted training mean
    shift = np.average(rows["Days"], weights=rows["w1"]) - rows["Days"].mean()
    np.testing.assert_allclose(pred.to_numpy() - pop.to_numpy(), res.coef["Days"] * shift, rtol=1e-9)


def test_unseen_factor_level_is_an_error():
    df = tm.load_dataset("sleepstudy")
    df["arm"] = np.where(df["Subject"].astype(int) % 2 == 0, "a", "b")
    res = tm.mix("Reaction ~ Days + arm + (1 | Subject)", df, progress=False)
    new = df.head(3).assign(arm=["a", "b", "c"])
    with pytest.raises(tm.DataError, match=r"'arm'.*'c'"):
        res.predict(new)
    np.testing.assert_allclose(res.predict(df.head(3)).to_numpy(), res.fitted().to_numpy()[:3], rtol=1e-12)


def test_predict_accepts_a_dict():
    df = tm.load_dataset("sleepstudy")
    res = tm.mix("Reaction ~ Days + (1 + Days | Subject)", df, progress=False)
    one = res.predict({"Days": 3, "Subject": "308"})
    many = res.predict({"Days": [3, 4], "Subject": ["308", "309"]})
    expect = res.predict(pd.DataFrame({"Days": [3, 4], "Subject": ["308", "309"]}))
    assert len(one) == 1 and one.iloc[0] == expect.iloc[0]
    np.testing.assert_allclose(many.to_numpy(), expect.to_numpy())
    with pytest.raises(tm.DataError, match="DataFrame or a dict"):
        res.predict([1, 2])


def test_population_level_predictions():
    df = sleepstudy_three_level()
    res = tm.mix("Reaction ~ Days + (1 | Subject) + (1 | Group)", df, progress=False)
    xb = res.coef["(Intercept)"] + res.coef["Days"] * df["Days"].to_numpy()
    np.testing.assert_allclose(res.predict(df, include_random=False).to_numpy(), xb, rtol=1e-12)
    np.testing.assert_allclose(res.fitted(include_random=False).to_numpy(), xb, rtol=1e-12)
    # population level needs no grouping columns
    np.testing.assert_allclose(res.predict({"Days": [0.0]}, include_random=False).to_numpy(),
                               [res.coef["(Intercept)"]], rtol=1e-12)
    grp = res.predict(df, include_random=["Group"]).to_numpy()
    b3 = res.ranef["Group"]["(Intercept)"].reindex(df["Group"]).to_numpy()
    np.testing.assert_allclose(grp, xb + b3, rtol=1e-12)
    with pytest.raises(tm.DataError, match="unknown grouping factor"):
        res.predict(df, include_random=["School"])


def test_population_level_logit_response():
    df = tm.load_dataset("sleepstudy")
    df["hi"] = (df["Reaction"] > 300).astype(int)
    res = tm.mix("hi ~ Days + (1 | Subject)", df, family="binomial", n_quad=1, progress=False)
    eta = res.coef["(Intercept)"] + res.coef["Days"] * 4.0
    got = res.predict({"Days": 4.0}, type="response", include_random=False).iloc[0]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-eta)), rtol=1e-12)
