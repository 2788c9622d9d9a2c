//! Recursive-descent parser from tokens to the query's syntax tree:
//! `SELECT [TOP n] (* | item, ...) FROM devices[.modules] [WHERE cond] [GROUP BY path, ...]`.
//! Keywords and function names are case-insensitive, as in the hub.

use super::lexer::{Spanned, Tok};
use super::{
    CmpOp, Collection, Expr, Literal, Operand, Path, Query, QueryError, Select, SelectItem,
};

/// Nesting allowed in a condition (parentheses, NOT); deeper is refused, not overflowed.
const MAX_NESTING: usize = 64;

pub struct Parser {
    toks: Vec<Spanned>,
    at: usize,
    depth: usize,
}

impl Parser {
    pub fn new(toks: Vec<Spanned>) -> Parser {
        Parser {
            toks,
            at: 0,
            depth: 0,
        }
    }

    fn peek(&self) -> &Spanned {
        &self.toks[self.at.min(self.toks.len() - 1)]
    }

    fn bump(&mut self) -> Spanned {
        let t = self.peek().clone();
        if self.at < self.toks.len() - 1 {
            self.at += 1;
        }
        t
    }

    fn error(&self, expected: &str) -> QueryError {
        let t = self.peek();
        QueryError::new(
            t.pos,
            format!("expected {expected} but found {}", t.tok.describe()),
        )
    }

    fn is_keyword(&self, kw: &str) -> bool {
        matches!(&self.peek().tok, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }

    fn eat_keyword(&mut self, kw: &str) -> bool {
        let yes = self.is_keyword(kw);
        if yes {
            self.bump();
        }
        yes
    }

    fn expect_keyword(&mut self, kw: &str) -> Result<(), QueryError> {
        if self.eat_keyword(kw) {
            Ok(())
        } else {
            Err(self.error(kw))
        }
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        let yes = &self.peek().tok == tok;
        if yes {
            self.bump();
        }
        yes
    }

    fn expect(&mut self, tok: &Tok) -> Result<(), QueryError> {
        if self.eat(tok) {
            Ok(())
        } else {
            Err(self.error(&tok.describe()))
        }
    }

    pub fn query(&mut self) -> Result<Query, QueryError> {
        self.expect_keyword("SELECT")?;
        let top = if self.eat_keyword("TOP") {
            match self.bump() {
                Spanned {
                    tok: Tok::Num(n), ..
                } if n >= 0.0 && n.fract() == 0.0 => Some(n as usize),
                t => {
                    return Err(QueryError::new(
                        t.pos,
                        format!("TOP takes a whole number, not {}", t.tok.describe()),
                    ))
                }
            }
        } else {
            None
        };
        let select = if self.eat(&Tok::Star) {
            Select::All
        } else {
            let mut items = vec![self.select_item()?];
            while self.eat(&Tok::Comma) {
                items.push(self.select_item()?);
            }
            Select::Items(items)
        };
        self.expect_keyword("FROM")?;
        let from = self.collection()?;
        let filter = if self.eat_keyword("WHERE") {
            Some(self.or()?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        if self.eat_keyword("GROUP") {
            self.expect_keyword("BY")?;
            group_by.push(self.path()?);
            while self.eat(&Tok::Comma) {
                group_by.push(self.path()?);
            }
        }
        if self.peek().tok != Tok::End {
            return Err(self.error("the end of the query"));
        }
        let query = Query {
            select,
            top,
            from,
            filter,
            group_by,
        };
        query.check_shape()?;
        Ok(query)
    }

    fn select_item(&mut self) -> Result<SelectItem, QueryError> {
        let pos = self.peek().pos;
        if self.is_keyword("COUNT")
            && self.toks.get(self.at + 1).map(|t| &t.tok) == Some(&Tok::LParen)
        {
            self.bump();
            self.bump();
            self.expect(&Tok::RParen)?;
            return Ok(SelectItem::Count {
                alias: self.alias()?,
            });
        }
        for f in ["AVG", "SUM", "MIN", "MAX"] {
            if self.is_keyword(f)
                && self.toks.get(self.at + 1).map(|t| &t.tok) == Some(&Tok::LParen)
            {
                return Err(QueryError::new(
                    pos,
                    format!("the aggregate {f}() is not emulated; only COUNT() is"),
                ));
            }
        }
        let path = self.path()?;
        Ok(SelectItem::Path {
            path,
            alias: self.alias()?,
        })
    }

    fn alias(&mut self) -> Result<Option<String>, QueryError> {
        if !self.eat_keyword("AS") {
            return Ok(None);
        }
        match self.bump() {
            Spanned {
                tok: Tok::Ident(name),
                ..
            } => Ok(Some(name)),
            t => Err(QueryError::new(
                t.pos,
                format!("expected a name after AS but found {}", t.tok.describe()),
            )),
        }
    }

    fn collection(&mut self) -> Result<Collection, QueryError> {
        let pos = self.peek().pos;
        if !self.eat_keyword("devices") {
            return Err(self.error("'devices' or 'devices.modules'"));
        }
        if !self.eat(&Tok::Dot) {
            return Ok(Collection::Devices);
        }
        if self.eat_keyword("modules") {
            return Ok(Collection::Modules);
        }
        if self.eat_keyword("jobs") {
            return Err(QueryError::new(
                pos,
                "FROM devices.jobs is not emulated (jobs are not)",
            ));
        }
        Err(self.error("'modules' after 'devices.'"))
    }

    /// A property path; a leading `devices.` or `devices.modules.` is dropped, as the
    /// hub accepts `devices.modules.moduleId` for `moduleId`.
    fn path(&mut self) -> Result<Path, QueryError> {
        let mut segments = vec![self.segment()?];
        while self.eat(&Tok::Dot) {
            segments.push(self.segment()?);
        }
        let strip = match segments.first().map(String::as_str) {
            Some("devices") if segments.get(1).map(String::as_str) == Some("modules") => 2,
            Some("devices") => 1,
            _ => 0,
        };
        segments.drain(..strip.min(segments.len() - 1));
        Ok(Path(segments))
    }

    fn segment(&mut self) -> Result<String, QueryError> {
        match &self.peek().tok {
            Tok::Ident(s) | Tok::Bracketed(s) => {
                let s = s.clone();
                self.bump();
                Ok(s)
            }
            _ => Err(self.error("a property name")),
        }
    }

    fn or(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.and()?;
        while self.eat_keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.unary()?;
        while self.eat_keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, QueryError>,
    ) -> Result<T, QueryError> {
        if self.depth >= MAX_NESTING {
            return Err(QueryError::new(
                self.peek().pos,
                format!("the condition nests deeper than {MAX_NESTING} levels"),
            ));
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn unary(&mut self) -> Result<Expr, QueryError> {
        if self.eat_keyword("NOT") {
            return self.nested(|p| Ok(Expr::Not(Box::new(p.unary()?))));
        }
        if self.eat(&Tok::LParen) {
            let inner = self.nested(Self::or)?;
            self.expect(&Tok::RParen)?;
            return Ok(inner);
        }
        if self.is_keyword("IS_DEFINED") {
            self.bump();
            self.expect(&Tok::LParen)?;
            let path = self.path()?;
            self.expect(&Tok::RParen)?;
            return Ok(Expr::IsDefined(path));
        }
        if let Tok::Ident(name) = &self.peek().tok {
            if self.toks.get(self.at + 1).map(|t| &t.tok) == Some(&Tok::LParen) {
                return Err(QueryError::new(
                    self.peek().pos,
                    format!("the function {name}() is not emulated; only IS_DEFINED() is"),
                ));
            }
        }
        let left = self.operand()?;
        let negated = self.is_keyword("NIN");
        if negated || self.is_keyword("IN") {
            self.bump();
            return Ok(Expr::In {
                operand: left,
                list: self.list()?,
                negated,
            });
        }
        let op = match self.peek().tok {
            Tok::Eq => CmpOp::Eq,
            Tok::Ne => CmpOp::Ne,
            Tok::Lt => CmpOp::Lt,
            Tok::Gt => CmpOp::Gt,
            Tok::Le => CmpOp::Le,
            Tok::Ge => CmpOp::Ge,
            _ => return Err(self.error("a comparison (=, !=, <, >, <=, >=, IN, NIN)")),
        };
        self.bump();
        let right = self.operand()?;
        Ok(Expr::Compare(left, op, right))
    }

    fn list(&mut self) -> Result<Vec<Literal>, QueryError> {
        self.expect(&Tok::LBracket)?;
        let mut items = Vec::new();
        if self.eat(&Tok::RBracket) {
            return Ok(items);
        }
        loop {
            let pos = self.peek().pos;
            match self.operand()? {
                Operand::Lit(l) => items.push(l),
                Operand::Path(_) => {
                    return Err(QueryError::new(pos, "IN and NIN lists hold only literals"))
                }
            }
            if self.eat(&Tok::RBracket) {
                return Ok(items);
            }
            self.expect(&Tok::Comma)?;
        }
    }

    fn operand(&mut self) -> Result<Operand, QueryError> {
        let lit = match &self.peek().tok {
            Tok::Str(s) => Some(Literal::Str(s.clone())),
            Tok::Num(n) => Some(Literal::Num(*n)),
            Tok::Ident(s) if s.eq_ignore_ascii_case("true") => Some(Literal::Bool(true)),
            Tok::Ident(s) if s.eq_ignore_ascii_case("false") => Some(Literal::Bool(false)),
            Tok::Ident(s) if s.eq_ignore_ascii_case("null") => Some(Literal::Null),
            Tok::Ident(_) | Tok::Bracketed(_) => None,
            _ => return Err(self.error("a property path or a literal")),
        };
        match lit {
            Some(l) => {
                self.bump();
                Ok(Operand::Lit(l))
            }
            None => Ok(Operand::Path(self.path()?)),
        }
    }
}
